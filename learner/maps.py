"""A project's embedding map: computing it (a round's ``map`` stage, or the ``compute_embedding_map`` task
after ingest or on an admin's request), storing it (``EmbeddingMap``, packed arrays) and serving it as one
binary payload the browser maps straight onto typed arrays.

The payload (content type ``application/vnd.histoloop.embedding-map``), all little-endian:

    bytes 0-3   b"HLMP"
    bytes 4-7   uint32 format version (1)
    bytes 8-11  uint32 header length H
    12..12+H    UTF-8 JSON header, padded with spaces so the first array starts on a multiple of 8
    then        the arrays the header's ``arrays`` list names, each at its ``offset`` (from the start of
                the payload, a multiple of 8) with ``count`` elements of ``dtype``:
                ``ids`` (uint32, or float64 when an id passes 2**32-1), ``xy`` (float32, x0 y0 x1 y1 ...),
                ``consensus``, ``prediction``, ``uncertainty`` (uint8) and ``slide`` (uint16).

Channel codes: ``consensus`` 0 = no label yet, k+1 = the project's k-th label (display order), 255 =
contested; ``prediction`` 0 = not scored, k+1 = the newest model's top class k (in its ``class_names``);
``uncertainty`` 0 = not scored, else 1 + the margin uncertainty's decile (1..10, 10 most uncertain);
``slide`` the index into the header's ``slides`` list. Colours are the client's business.

Colours are computed when the map is served, from the consensus rows and the newest model version's
SlideScores, so a label cast a second ago shows; the positions come from the stored layout.
"""

from __future__ import annotations

import json
import struct
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from annotations.models import Consensus, LabelClass, Project, Slide
from learner.core.embedding_store import Rows
from learner.core.errors import LearnerError, ProgressFn, StopFn
from learner.core.strategies import margin

from . import layout, scores
from .conf import LearnerSettings, learner_settings
from .models import EmbeddingMap, ModelVersion, SlideScores

if TYPE_CHECKING:  # the web processes serve the map without importing torch/timm (learner.embedding does)
    from .round_stages import Pool

CONTENT_TYPE = "application/vnd.histoloop.embedding-map"
MAGIC = b"HLMP"
FORMAT_VERSION = 1
CONTESTED = 255
UNCERTAINTY_BUCKETS = 10


def method(cfg: LearnerSettings) -> str:
    return cfg.MAP_METHOD


def latest(project: Project) -> EmbeddingMap | None:
    return EmbeddingMap.objects.filter(project=project).order_by("-created_at", "-id").first()


def layout_for_pool(
    project: Project,
    patch_ids: np.ndarray,
    slide_ids: np.ndarray,
    emb: Rows,
    cfg: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    force: bool = False,
) -> tuple[layout.Layout, float] | None:
    """A new layout of this pool and the seconds it took, or None when the newest stored map already
    lays out exactly this pool with the configured method (``force`` computes it anyway)."""
    digest = layout.pool_digest(patch_ids)
    current = latest(project)
    if not force and current is not None and current.pool_digest == digest and current.method == method(cfg):
        return None
    started = time.perf_counter()
    xy = layout.compute_xy(emb, method=method(cfg), seed=project.seed, progress=progress, should_stop=should_stop)
    built = layout.Layout(patch_ids=patch_ids, slide_ids=slide_ids, xy=xy, method=method(cfg), pool_digest=digest)
    return built, time.perf_counter() - started


def map_stage(
    project: Project, pool: Pool, emb: Rows, cfg: LearnerSettings, progress: ProgressFn | None, stop: StopFn | None
) -> tuple[layout.Layout, float] | None:
    """A round's ``map`` stage: the pool's layout, unless the stored one is of the same pool."""
    return layout_for_pool(project, pool.patch_ids, pool.slide_ids, emb, cfg, progress=progress, should_stop=stop)


def save(project: Project, built: layout.Layout, seconds: float, version: ModelVersion | None = None) -> EmbeddingMap:
    return EmbeddingMap.objects.create(
        project=project, model_version=version, seconds=round(seconds, 3), **layout.pack(built)
    )


def compute_project_map(
    project: Project,
    *,
    cfg: LearnerSettings | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> EmbeddingMap | None:
    """Lay out the project's pool now (embedding from the pixels whatever the store lacks): the task's body.
    Returns the new map, or None when the stored one is already of this pool."""
    from .embedding import pool_embeddings, project_backbone
    from .round_stages import _pool_rows

    cfg = cfg or learner_settings()
    rows = _pool_rows(project)
    if not len(rows):
        raise LearnerError("The project has no patches yet; add slides and wait until they are ready.")
    patch_ids, slide_ids = rows[:, 0].copy(), rows[:, 1].copy()
    emb = pool_embeddings(
        project.patch_size, patch_ids, slide_ids, rows[:, 2], rows[:, 3], rows[:, 4],
        project_backbone(project, cfg), cfg, progress=progress, should_stop=should_stop,
    )  # fmt: skip
    del rows
    result = layout_for_pool(
        project, patch_ids, slide_ids, emb, cfg, progress=progress, should_stop=should_stop, force=force
    )
    if result is None:
        return None
    version = ModelVersion.objects.filter(project=project).order_by("-created_at").first()
    return save(project, result[0], result[1], version)


# --- the payload ---------------------------------------------------------------------------------------------------


def _lookup(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``ids`` (ascending) of ``wanted``, mask of the wanted found there)."""
    if not len(ids):
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return at, ids[at] == wanted


def consensus_channel(project: Project, ids: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    labels = list(LabelClass.objects.filter(project=project).order_by("order").values("id", "name", "colour"))
    code = {lab["id"]: i + 1 for i, lab in enumerate(labels)}
    out = np.zeros(len(ids), dtype=np.uint8)
    rows = np.array(
        [
            (pid, CONTESTED if status == Consensus.Status.CONTESTED else code.get(label_id, 0))
            for pid, label_id, status in Consensus.objects.filter(project=project)
            .exclude(status=Consensus.Status.PENDING)
            .values_list("patch_id", "label_id", "status")
            .iterator(chunk_size=50_000)
        ],
        dtype=np.int64,
    ).reshape(-1, 2)
    at, found = _lookup(ids, rows[:, 0])
    out[at[found]] = rows[found, 1]
    return out, labels


def model_channels(
    version: ModelVersion | None, ids: np.ndarray, slide_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, uncertainty bucket) per map point from the version's per-slide scores."""
    prediction = np.zeros(len(ids), dtype=np.uint8)
    uncertainty = np.zeros(len(ids), dtype=np.uint8)
    if version is None:
        return prediction, uncertainty
    n_classes = len(version.class_names)
    for row in SlideScores.objects.filter(model_version=version, slide_id__in=np.unique(slide_ids).tolist()).iterator(
        chunk_size=16
    ):
        scored, probs = scores.unpack(row, n_classes)
        at, found = _lookup(ids, scored)
        top = np.argmax(probs, axis=1)
        u = margin(probs.astype(np.float64))
        prediction[at[found]] = (top[found] + 1).astype(np.uint8)
        bucket = np.clip(np.ceil(u[found] * UNCERTAINTY_BUCKETS), 1, UNCERTAINTY_BUCKETS)
        uncertainty[at[found]] = bucket.astype(np.uint8)
    return prediction, uncertainty


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


def payload(project: Project, stored: EmbeddingMap) -> bytes:
    """The binary map (module docstring) of a stored layout, coloured as the project is now."""
    ids, slide_ids, xy = layout.unpack(stored.patch_ids, stored.slide_ids, stored.xy)
    consensus, labels = consensus_channel(project, ids)
    version = ModelVersion.objects.filter(project=project).order_by("-created_at").first()
    prediction, uncertainty = model_channels(version, ids, slide_ids)
    slides, slide_index = np.unique(slide_ids, return_inverse=True)
    names = dict(Slide.objects.filter(pk__in=slides.tolist()).values_list("pk", "name"))
    wide = bool(len(ids)) and int(ids.max()) > 2**32 - 1
    arrays: list[tuple[str, np.ndarray]] = [
        ("ids", ids.astype("<f8" if wide else "<u4")),
        ("xy", np.ascontiguousarray(xy, dtype="<f4").reshape(-1)),
        ("consensus", consensus),
        ("prediction", prediction),
        ("uncertainty", uncertainty),
        ("slide", slide_index.astype("<u2")),
    ]
    dtypes = {"<f8": "float64", "<u4": "uint32", "<f4": "float32", "|u1": "uint8", "<u2": "uint16"}
    header: dict[str, Any] = {
        "count": len(ids),
        "map": stored.pk,
        "method": stored.method,
        "created_at": stored.created_at.isoformat(),
        "labels": [{"code": i + 1, **lab} for i, lab in enumerate(labels)],
        "contested_code": CONTESTED,
        "model_version": version.pk if version else None,
        "classes": [{"code": i + 1, "name": n} for i, n in enumerate(version.class_names)] if version else [],
        "uncertainty_buckets": UNCERTAINTY_BUCKETS,
        "slides": [{"id": int(s), "name": names.get(int(s), "")} for s in slides.tolist()],
        "arrays": [],
    }
    # The header's size depends on the offsets written into it: lay out with a generous guess, then fix.
    guess = 0
    while True:
        offset = _align(12 + guess)
        described = []
        for name, array in arrays:
            described.append({"name": name, "dtype": dtypes[array.dtype.str], "offset": offset, "count": len(array)})
            offset = _align(offset + array.nbytes)
        header["arrays"] = described
        text = json.dumps(header, separators=(",", ":")).encode()
        if 12 + len(text) <= _align(12 + guess):
            break
        guess = len(text)
    first = described[0]["offset"]
    text = text.ljust(first - 12, b" ")
    parts = [MAGIC, struct.pack("<II", FORMAT_VERSION, len(text)), text]
    at = first
    for (_, array), desc in zip(arrays, described, strict=True):
        parts.append(b"\0" * (desc["offset"] - at))
        parts.append(array.tobytes())
        at = desc["offset"] + array.nbytes
    return b"".join(parts)
