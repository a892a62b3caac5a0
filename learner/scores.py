"""A model version's per-patch probabilities, stored one row per slide (``SlideScores``) and read back for
the heatmap and the prediction endpoint.

Why rows and not files: they are written in the publish transaction (a round that fails or is cancelled
leaves none, with no file to clean up), the web server reads them without a shared disk, and pruning is a
DELETE. Why packed arrays and not a row per patch: a round over a million patches writes one row per slide
(about 12 bytes a patch for three classes before compression) instead of a million rows.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from learner.core.strategies import margin

from .models import ModelVersion, SlideScores

# zlib's fastest level: the ascending ids compress well at it, the probabilities little at any level.
ZLIB_LEVEL = 1


def pack(patch_ids: np.ndarray, proba: np.ndarray) -> tuple[bytes, bytes]:
    ids = np.ascontiguousarray(patch_ids, dtype="<i8")
    probs = np.ascontiguousarray(proba, dtype="<f4")
    return zlib.compress(ids.tobytes(), ZLIB_LEVEL), zlib.compress(probs.tobytes(), ZLIB_LEVEL)


def unpack(row: SlideScores, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch ids, probabilities (patches, classes)) of one slide's row."""
    ids = np.frombuffer(zlib.decompress(bytes(row.patch_ids)), dtype="<i8")
    probs = np.frombuffer(zlib.decompress(bytes(row.probs)), dtype="<f4").reshape(len(ids), n_classes)
    return ids, probs


def write(version: ModelVersion, patch_ids: np.ndarray, slide_ids: np.ndarray, proba: np.ndarray) -> int:
    """One SlideScores row per slide of the pool; returns the rows written."""
    order = np.lexsort((patch_ids, slide_ids))
    bounds = np.flatnonzero(np.diff(slide_ids[order])) + 1
    rows = []
    for part in np.split(order, bounds):
        if not len(part):
            continue
        ids, probs = pack(patch_ids[part], proba[part])
        rows.append(
            SlideScores(
                model_version=version,
                slide_id=int(slide_ids[part[0]]),
                n_patches=len(part),
                patch_ids=ids,
                probs=probs,
            )
        )
    SlideScores.objects.bulk_create(rows, batch_size=100)
    return len(rows)


@dataclass(frozen=True)
class PatchScore:
    """What one model version says of one patch."""

    model_version: ModelVersion
    probs: list[float]
    predicted: int
    uncertainty: float  # 1 - (top-1 minus top-2 probability), what the queue ranks by


def for_slide(version: ModelVersion, slide_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch ids, probabilities) of a slide's patches by this version; empty when it scored none."""
    row = SlideScores.objects.filter(model_version=version, slide_id=slide_id).first()
    if row is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(version.class_names)), dtype=np.float32)
    return unpack(row, len(version.class_names))


def for_patch(project_id: int, slide_id: int, patch_id: int) -> PatchScore | None:
    """The newest model version's score of a patch (None when no version scored it)."""
    rows = (
        SlideScores.objects.filter(model_version__project_id=project_id, slide_id=slide_id)
        .select_related("model_version")
        .order_by("-model_version__created_at", "-model_version_id")
    )
    for row in rows.iterator(chunk_size=4):
        ids, probs = unpack(row, len(row.model_version.class_names))
        at = int(np.searchsorted(ids, patch_id))
        if at < len(ids) and ids[at] == patch_id:
            p = probs[at : at + 1].astype(np.float64)
            return PatchScore(
                model_version=row.model_version,
                probs=[float(v) for v in p[0]],
                predicted=int(np.argmax(p[0])),
                uncertainty=float(margin(p)[0]),
            )
    return None
