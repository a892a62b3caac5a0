"""The ``LEARNER`` settings namespace, read into a dataclass (defaults here, overrides in settings)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from django.conf import settings


@dataclass(frozen=True)
class LearnerSettings:
    WEIGHTS_DIR: Path = Path("var/models")
    CACHE_DIR: Path = Path("var/cache")
    DEVICE: str = "auto"
    PRETRAINED: str = "package"  # "package" | "timm" (online) | "none" | a path to a weights file or folder
    # Where a project's own backbone weights (Project.backbone_weights, a path relative to this) are placed.
    PRETRAINED_DIR: Path = Path("var/pretrained")
    MIN_LABELS: int = 6
    VALIDATION_FRACTION: float = 0.2
    STALE_AFTER_SECONDS: int = 180  # a running round silent for this long has lost its worker
    EMBED_BATCH_SIZE: int = 32
    TTA: bool = False
    # Head mode: one round of self-training on the unlabelled pool (pseudo-labels where the head's
    # probability exceeds the threshold). bench_active_learning.py measures it against the plain head.
    SELF_TRAINING: bool = True
    SELF_TRAINING_THRESHOLD: float = 0.95
    # Head-mode embeddings also pool the backbone's last three stages (BackboneSpec.multiscale): +0.5 to 1
    # point of test accuracy on LC25000 at the same labels, at no extra forward cost (bench_active_learning).
    MULTISCALE: bool = True
    # A pool whose embeddings fit in this many MB is read into memory once per round; a larger one is read
    # from the per-slide files chunk by chunk, so a round's memory stays bounded whatever the pool size.
    EMBEDDINGS_IN_MEMORY_MB: int = 512
    # Self-training pseudo-labels at most this many confident pool patches (a seeded sample of them):
    # more adds little to a linear head and its fit time grows with every row.
    MAX_PSEUDO_LABELS: int = 20_000
    # A head fits on at most this many labels (a seeded sample drawn class by class beyond it): its float64
    # design matrix is 8 bytes a value, 0.76 GB at 1,904 features, with the pseudo-labels beside it.
    HEAD_MAX_LABELS: int = 50_000
    # The CPU embedding pass's inference backend (learner.core.runtime): "auto" (the fastest installed
    # runtime whose embeddings equal torch's within EMBED_ATOL; ONNX Runtime), "torch", "onnxruntime" or
    # "openvino". A GPU and fine-tune training always use torch. bench_embed.py measures them.
    CPU_BACKEND: str = "auto"
    # How patches are decoded while the network runs (learner.core.data.Reader): "threads" (a pool over
    # large-image, whose decoders release the GIL), "processes" (DataLoader workers) or "serial".
    EMBED_READER: str = "threads"
    EMBED_READERS: int = 2
    # Embedding shards (learner.shards): a slide with more patches than this is split into chunks of this
    # many; smaller slides are packed together up to it. A worker killed mid-shard loses at most one shard.
    SHARD_PATCHES: int = 2048
    # The Celery queue shards are sent to; every worker consuming it takes them.
    SHARD_QUEUE: str = "gpu"
    # Queue low-priority shards for a slide as soon as its ingest makes it ready, so rounds find it embedded.
    BACKGROUND_EMBEDDING: bool = True
    # The embedding map's layout (learner.layout): "pca" or "umap" (needs umap-learn); bench_map.py times both.
    MAP_METHOD: str = "pca"
    # A round lays out its pool for the map (its "map" stage) unless the stored layout is of the same pool.
    MAP_IN_ROUNDS: bool = True


def project_weights(value: str, cfg: LearnerSettings) -> str:
    """The weights a project's backbone loads: its own file or folder under PRETRAINED_DIR (``value``, relative
    to it), else the platform's PRETRAINED. Raises ValueError, with the sentence to show, for a path that
    leaves PRETRAINED_DIR (a project admin must not make the worker read any file on the machine)."""
    if not value:
        return cfg.PRETRAINED
    root = cfg.PRETRAINED_DIR.resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"Backbone weights must be a file or folder inside LEARNER_PRETRAINED_DIR ({root}).")
    return str(path)


def learner_settings() -> LearnerSettings:
    raw = getattr(settings, "LEARNER", {})
    known = {f.name: f for f in fields(LearnerSettings)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            continue
        default = getattr(LearnerSettings, key)
        if isinstance(default, Path):
            value = Path(value)
        elif isinstance(default, bool):
            value = str(value).lower() in {"1", "true", "yes"} if isinstance(value, str) else bool(value)
        elif isinstance(default, int | float):
            value = type(default)(value)
        values[key] = value
    return LearnerSettings(**values)
