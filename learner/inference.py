"""How the platform's embedding pass runs: the CPU inference backend and the patch reader from settings,
and the locality order patches are read in. ``learner.embedding`` passes these to ``embed``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import large_image

from annotations.models import Patch
from learner.core.data import Reader, ReaderKind

from .conf import LearnerSettings


def runtime_dir(cfg: LearnerSettings) -> Path:
    """Where exported inference graphs are cached, one folder per embedding model id."""
    return cfg.CACHE_DIR / "runtime"


def reader(cfg: LearnerSettings) -> Reader:
    return Reader(kind=cast(ReaderKind, cfg.EMBED_READER), workers=cfg.EMBED_READERS, pin=cfg.DEVICE != "cpu")


def embed_options(cfg: LearnerSettings) -> dict[str, Any]:
    """Keyword arguments of ``learner.core.embeddings.embed`` that choose the backend and the reader."""
    return {"backend": cfg.CPU_BACKEND, "runtime_cache": runtime_dir(cfg), "reader": reader(cfg)}


def locality(patches: list[Patch]) -> Any:
    """Sort key of pool index i: (slide, y, x), so neighbouring patches are read from tiles just decoded."""
    return lambda i: (patches[i].slide_id, patches[i].y, patches[i].x)


def drop_slide_handles() -> None:
    """In a forked reader process: close the tile sources (and their file offsets) copied from the parent."""
    large_image.cache_util.cachesClear()
