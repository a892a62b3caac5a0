"""Where a project's embeddings live in the store: light enough for web processes to import (no torch, no
timm), which read the store's files to build and query "more like this" without a backbone."""

from __future__ import annotations

from pathlib import Path

from .conf import LearnerSettings


def slide_key(checksum: str, slide_id: int, size: int, patch_size: int) -> str:
    """The store's name for a slide's patches of one geometry: its content when known, so identical
    pixels share it across projects (a slide without a checksum is keyed by its row, unshared)."""
    content = checksum or f"slide-{slide_id}"
    return f"{content}-{size}-{patch_size}"


def cache_dir(cfg: LearnerSettings) -> Path:
    return cfg.CACHE_DIR / "embeddings"
