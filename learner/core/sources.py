"""Where a backbone's architecture comes from: a timm registry name, or a Hugging Face hub id (`hf-hub:org/name`)
built offline from what its model card tells timm, or from the repository's own `config.json` beside the weights.

Why this exists: `timm.create_model("hf-hub:...")` fetches the repository's `config.json` from the hub even
with `pretrained=False`, so a lab without network (or with its weights copied from elsewhere) could not build
a pathology foundation model at all. Here the architecture is resolved without the hub: from a folder laid out
as the hub repository (`config.json` + `model.safetensors` / `pytorch_model.bin`, as `huggingface-cli
download` writes it), or, for the models listed in HUB_MODELS, from their published recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked

from learner.core.errors import LearnerError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The file names a hub repository's weights go by, preferred first (timm's own order: safetensors first).
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class HubModel:
    """A foundation model published as a timm model on the hub: the arguments its model card passes to
    `timm.create_model` (the layer classes included, which its config.json cannot hold) and its normalisation.
    Whether the hub asks for a licence agreement first is in the README (it is the model card's to say)."""

    architecture: str
    kwargs: dict[str, Any]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": ""}
_SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
_H_OPTIMUS = HubModel(
    "vit_giant_patch14_reg4_dinov2",
    {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
)
_UNI2 = {
    "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
}  # fmt: skip

# Keyed by the lower-cased repository id (the hub treats ids case-insensitively: MahmoodLab/UNI = MahmoodLab/uni).
# Virchow's global_pool "" (all tokens out) is pooled as its model card says: class token + mean patch token.
HUB_MODELS: dict[str, HubModel] = {
    "mahmoodlab/uni": HubModel(
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
    ),
    "mahmoodlab/uni2-h": HubModel("vit_giant_patch14_224", {**_UNI2, **_SWIGLU}),
    "paige-ai/virchow": HubModel("vit_huge_patch14_224", {**_VIRCHOW, "dynamic_img_size": True, **_SWIGLU}),
    "paige-ai/virchow2": HubModel(
        "vit_huge_patch14_224", {**_VIRCHOW, "reg_tokens": 4, "dynamic_img_size": True, **_SWIGLU}
    ),
    "bioptimus/h-optimus-0": _H_OPTIMUS,
    "bioptimus/h-optimus-1": _H_OPTIMUS,
    "prov-gigapath/prov-gigapath": HubModel(
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How to build a backbone name's network without the hub: a timm architecture, its arguments, what its
    config says about its input (mean, std, input size: laid over the architecture's own pretrained_cfg) and
    the config file it was read from (part of the weights' identity)."""

    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    config_file: Path | None = None

    @property
    def hub_model(self) -> HubModel | None:
        return HUB_MODELS.get(self.hub_id.split("@")[0].lower()) if self.hub_id else None


def hub_id(name: str) -> str | None:
    """The repository id of an `hf-hub:` name (revision included), else None."""
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].strip() or None
    return None


def known_name(name: str) -> bool:
    """Whether `name` can name a backbone at all: a timm model, or an `hf-hub:org/repo` id."""
    hub = hub_id(name)
    if hub is not None:
        return hub.count("/") == 1 and all(part for part in hub.split("@")[0].split("/"))
    return timm.is_model(name)


def weights_file(path: Path) -> Path:
    """The weights file a path names: itself, or in a folder laid out as a hub repository, its one weights file."""
    if not path.is_dir():
        return path
    for candidate in WEIGHTS_NAMES:
        if (path / candidate).is_file():
            return path / candidate
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise LearnerError(
            f"The folder {path} holds no weights file ({', '.join(WEIGHTS_NAMES)}, or one "
            f"{'/'.join(WEIGHTS_SUFFIXES)} file)."
        )
    raise LearnerError(f"The folder {path} holds {len(found)} weights files; name the one to use.")


def config_beside(path: Path | None) -> Path | None:
    """A hub repository's config.json in the weights' folder (or the folder named), if there is one."""
    if path is None:
        return None
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    return config if config.is_file() else None


def _read_config(config: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, model args, pretrained cfg) of a timm hub config.json (both its layouts, as timm reads them)."""
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LearnerError(f"Could not read the model configuration {config}: {exc}.") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise LearnerError(
            f"{config} is not a timm model configuration (it has no 'architecture'); a hub repository for "
            "transformers rather than timm cannot be used as a backbone."
        )
    pretrained = cfg.get("pretrained_cfg", {k: v for k, v in cfg.items() if k not in ("architecture", "model_args")})
    args = cfg.get("model_args") or {}
    if not isinstance(pretrained, dict) or not isinstance(args, dict):
        raise LearnerError(f"{config} has a pretrained_cfg or model_args that is not an object.")
    return cfg["architecture"], dict(args), dict(pretrained)


def recipe(name: str, weights: Path | None) -> Recipe:
    """The network `name` stands for, resolved without any network access.

    A timm name is its own architecture. An `hf-hub:` id is read from a config.json beside `weights` (a
    folder laid out as the repository), else from HUB_MODELS; one that is neither cannot be built offline.
    """
    hub = hub_id(name)
    if hub is None:
        if not timm.is_model(name):
            raise LearnerError(
                f"Unknown backbone '{name}'. Pick a timm model name such as 'tf_efficientnet_lite0' or "
                "'vit_small_patch16_224', or a Hugging Face hub id such as 'hf-hub:MahmoodLab/UNI'."
            )
        return Recipe(architecture=name)
    if not known_name(name):
        raise LearnerError(f"'{name}' is not a Hugging Face hub id; write it as hf-hub:ORGANISATION/MODEL.")
    known = HUB_MODELS.get(hub.split("@")[0].lower())
    config = config_beside(weights)
    if config is not None:
        architecture, args, pretrained = _read_config(config)
        if not timm.is_model(architecture):
            raise LearnerError(f"{config} names the architecture '{architecture}', which this timm does not have.")
        if known is not None and known.architecture == architecture:
            args = {**args, **{k: v for k, v in known.kwargs.items() if not isinstance(v, int | float | str)}}
        keep = ("mean", "std", "input_size", "fixed_input_size", "tag")
        return Recipe(architecture, args, {k: pretrained[k] for k in keep if k in pretrained}, hub, config)
    if known is None:
        raise LearnerError(
            f"'{name}' cannot be built offline: put the repository's config.json beside its weights file (the "
            "folder `huggingface-cli download` writes), or use weights 'timm' on a machine with network access."
        )
    cfg = {"mean": known.mean, "std": known.std, "input_size": (3, 224, 224)}
    return Recipe(known.architecture, dict(known.kwargs), cfg, hub)


def online_kwargs(name: str) -> dict[str, Any]:
    """What `timm.create_model(name, pretrained=True)` needs beyond the hub's config.json: the arguments its
    model card passes (layer classes, LayerScale init), for the models HUB_MODELS lists."""
    hub = hub_id(name)
    known = HUB_MODELS.get(hub.split("@")[0].lower()) if hub else None
    return dict(known.kwargs) if known is not None else {}
