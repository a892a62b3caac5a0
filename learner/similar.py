"""A project's "more like this" index: built on the ``cpu`` worker after each round from the embedding
store, kept as files under ``MEDIA_ROOT/similar/project-<id>/``, queried by the web server.

One index per project and embedding model, named by a fingerprint of what it holds (the embedding model,
the pool's patch ids and their slides' store keys): a round whose pool and embeddings are unchanged
rebuilds nothing, and one after new slides, or a project whose backbone changed, writes a new index and
points ``current.json`` at it (replaced atomically, so a reader sees the old index or the new one, never
half of one); older files are removed after the switch. Web processes cache the loaded index (memory-mapped,
so the page cache holds one copy for all of them) until ``current.json`` names another.

Only patches whose embeddings are in the store are indexed; a patch added since (a new slide) has
no neighbours until the next round embeds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from django.conf import settings
from django.db import transaction

from annotations.models import Patch, Project, Slide
from learner.core.embedding_store import EmbeddingStore, SlideRows
from learner.core.errors import LearnerError

from .conf import learner_settings
from .store_paths import cache_dir, slide_key

if TYPE_CHECKING:  # faiss is imported on first use: pages and workers that never search do not load it
    from learner.core.similarity import SimilarityIndex

logger = logging.getLogger(__name__)
MAX_K = 500


class NotIndexed(LearnerError):
    """The project has no index yet, or this patch is not in it."""


@dataclass(frozen=True)
class Neighbours:
    patch_ids: np.ndarray
    distances: np.ndarray
    model_id: str
    indexed: int


def folder(project_id: int) -> Path:
    return Path(settings.MEDIA_ROOT) / "similar" / f"project-{int(project_id)}"


def _pointer(project_id: int) -> Path:
    return folder(project_id) / "current.json"


def read_pointer(project_id: int) -> dict[str, Any] | None:
    try:
        data = json.loads(_pointer(project_id).read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(target: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, target)


def pool_for_index(project: Project, model_id: str, dim: int) -> tuple[np.ndarray, SlideRows, str]:
    """(patch ids ascending, their embeddings, fingerprint) of the project's ready patches that the store
    holds for ``model_id``."""
    store = EmbeddingStore(cache_dir(learner_settings()) / "slides", model_id, dim)
    slides = dict(Slide.objects.filter(project=project, status=Slide.Status.READY).values_list("pk", "checksum"))
    rows = np.array(
        Patch.objects.filter(project=project, slide_id__in=list(slides))
        .order_by("id")
        .values_list("id", "slide_id", "x", "y", "size"),
        dtype=np.int64,
    ).reshape(-1, 5)
    files: list[str] = []
    keys: list[str] = []
    seg = np.full(len(rows), -1, dtype=np.int32)
    row = np.full(len(rows), -1, dtype=np.int64)
    order = np.lexsort((rows[:, 4], rows[:, 1]))
    s, z = rows[order, 1], rows[order, 4]
    bounds = np.flatnonzero((np.diff(s) != 0) | (np.diff(z) != 0)) + 1
    for part in np.split(order, bounds):
        if not len(part):
            continue
        sid, psize = int(rows[part[0], 1]), int(rows[part[0], 4])
        key = slide_key(slides.get(sid, ""), sid, psize, project.patch_size)
        found = store.lookup(key, rows[part, 2:4])
        seg[part], row[part] = len(files), found
        files.append(store.vectors_file(key))
        keys.append(key)
    have = row >= 0
    ids = rows[have, 0]
    digest = hashlib.sha256(f"{model_id}|{dim}|".encode())
    digest.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    digest.update("|".join(sorted(keys)).encode())
    return ids, SlideRows(files, seg[have], row[have], dim), digest.hexdigest()[:20]


def build_index(project: Project, model_id: str, dim: int) -> dict[str, Any] | None:
    """(Re)build the project's index for this embedding model unless the current one already holds exactly
    this pool; returns the pointer now current (None when nothing is embedded yet)."""
    ids, rows, fingerprint = pool_for_index(project, model_id, dim)
    current = read_pointer(project.pk)
    if current is not None and current.get("fingerprint") == fingerprint:
        return current
    if not len(ids):
        return None
    target = folder(project.pk)
    target.mkdir(parents=True, exist_ok=True)
    from learner.core import similarity

    built = similarity.build(rows, seed=project.seed)
    name = f"{model_id}-{fingerprint}"
    index_path = target / f"{name}.faiss"
    built.save(index_path)
    np.save(target / f"{name}.ids.npy", ids)
    pointer = {"model_id": model_id, "dim": dim, "fingerprint": fingerprint, "name": name, "n": len(ids)}
    _write_json_atomic(_pointer(project.pk), pointer)
    for old in target.iterdir():  # earlier indexes: readers that still map one keep it until they close it
        if not old.name.startswith(name) and old.name != "current.json":
            old.unlink(missing_ok=True)
    logger.info("Similarity index of project %s: %s patches (%s)", project.pk, len(ids), name)
    return pointer


def schedule_build(project_id: int, model_id: str, dim: int) -> None:
    """Ask the ``cpu`` worker to build the index once the current transaction (if any) commits."""
    from .tasks import build_similar_index

    transaction.on_commit(lambda: build_similar_index.apply_async(args=(project_id, model_id, dim), queue="cpu"))


# --- querying (web processes) ---------------------------------------------------------------------------------------

_cache: dict[int, tuple[str, SimilarityIndex, np.ndarray]] = {}
_lock = threading.Lock()


def _loaded(project_id: int) -> tuple[dict[str, Any], SimilarityIndex, np.ndarray]:
    from learner.core.similarity import SimilarityIndex

    pointer = read_pointer(project_id)
    if pointer is None:
        raise NotIndexed("No similarity index yet: it is built after the project's first training round.")
    name = str(pointer["name"])
    with _lock:
        hit = _cache.get(project_id)
        if hit is not None and hit[0] == name:
            return pointer, hit[1], hit[2]
    base = folder(project_id) / name
    try:
        index = SimilarityIndex.load(Path(f"{base}.faiss"))
        ids = np.load(f"{base}.ids.npy", mmap_mode="r")
    except (OSError, RuntimeError, ValueError) as exc:
        raise NotIndexed("The similarity index is being replaced; try again in a moment.") from exc
    with _lock:
        _cache[project_id] = (name, index, ids)
    return pointer, index, ids


def neighbours(project_id: int, patch_id: int, k: int) -> Neighbours:
    """The ``k`` patches nearest to ``patch_id`` in embedding space (itself excluded), nearest first."""
    pointer, index, ids = _loaded(project_id)
    at = int(np.searchsorted(ids, patch_id))
    if at >= len(ids) or int(ids[at]) != patch_id:
        raise NotIndexed("This patch is not in the similarity index yet; it is added after the next round.")
    rows, dist = index.search_row(at, min(int(k), MAX_K))
    return Neighbours(
        patch_ids=np.asarray(ids[rows], dtype=np.int64),
        distances=dist,
        model_id=str(pointer["model_id"]),
        indexed=int(pointer["n"]),
    )
