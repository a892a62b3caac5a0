"""A project's patches as the learner sees them: their pixels, their embedding cache keys, the platform's
backbone and the one embed step that rounds, the simulation and the benchmarks share.

Everything that decides which vector a patch gets (backbone name and weights, multiscale pooling, input
size, TTA, the cache key) is decided here, so a simulation's source pass fills exactly the cache entries a
round later reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from annotations.models import Patch
from annotations.slides import tiles
from learner.core.backbone import Backbone, create_backbone
from learner.core.config import BackboneSpec
from learner.core.data import LazyImages
from learner.core.embeddings import embed
from learner.core.errors import ProgressFn, StopFn

from .conf import LearnerSettings

# Larger patches are resized to the backbone's usual input rather than embedded at full size.
MAX_NATIVE_SIZE = 256
RESIZED_TO = 224


def patch_key(patch: Patch) -> str:
    """Embedding cache key: the slide's content and the patch geometry, so identical pixels share it."""
    return f"{patch.slide.checksum}:{patch.x}:{patch.y}:{patch.size}:{patch.project.patch_size}"


def patch_images(patches: list[Patch]) -> LazyImages:
    """The patches' pixels, read from their slides when asked for (``select_related("slide", "project")``)."""
    return LazyImages(lambda i: tiles.read_patch(patches[i]), len(patches))


def image_size(patch_size: int) -> int:
    """The side a project's patches are fed to the network at."""
    return patch_size if patch_size <= MAX_NATIVE_SIZE else RESIZED_TO


def backbone_spec(name: str, cfg: LearnerSettings) -> BackboneSpec:
    return BackboneSpec(name=name, weights=cfg.PRETRAINED, multiscale=cfg.MULTISCALE)


def platform_backbone(name: str, cfg: LearnerSettings) -> Backbone:
    """The feature extractor a round of a project with backbone ``name`` embeds with."""
    return create_backbone(backbone_spec(name, cfg))


def cache_dir(cfg: LearnerSettings) -> Path:
    return cfg.CACHE_DIR / "embeddings"


def embed_patches(
    patches: list[Patch],
    backbone: Backbone,
    cfg: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """Embeddings (N, features) of ``patches`` (all of one project), computing only what the cache lacks."""
    if not patches:
        return np.zeros((0, backbone.num_features), dtype=np.float32)
    return embed(
        backbone,
        patch_images(patches),
        keys=[patch_key(p) for p in patches],
        cache_dir=cache_dir(cfg),
        image_size=image_size(patches[0].project.patch_size),
        batch_size=cfg.EMBED_BATCH_SIZE,
        tta=cfg.TTA,
        device=cfg.DEVICE,
        progress=progress,
        should_stop=should_stop,
    )
