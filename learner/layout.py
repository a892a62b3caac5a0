"""The embedding map: a 2-D layout of a project's pool, computed from the embedding store and stored as
packed arrays (one ``EmbeddingMap`` row per layout, never a row per patch).

Why this method: ``tests/bench/bench_map.py`` times it. The layout is fitted on a seeded sample of at most
``FIT_SAMPLE`` pool patches and every patch is then projected chunk by chunk (``Rows.chunks``), so memory is
bounded by the sample and one chunk whatever the pool size, and time grows with one sequential read of the
embeddings. Two methods:

- ``pca`` (the default): the first two principal components (randomised SVD on the sample). Projection is
  one small matrix product per chunk, so a million patches cost little more than reading them.
- ``umap`` (``umap-learn``, when it is installed): UMAP on the sample's first ``UMAP_PCA_DIMS`` principal
  components, the rest placed by ``UMAP.transform``. Clusters separate better, at many times PCA's cost
  (see the benchmark); a project opts in with ``LEARNER["MAP_METHOD"] = "umap"``.

Coordinates are scaled into [-1, 1] on both axes (what the WebGL scatterplot draws in without a camera
transform), keeping the aspect ratio.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from learner.core.embedding_store import Rows
from learner.core.errors import LearnerError, ProgressFn, StopFn, check_stop, report

# Patches the layout is fitted on (a seeded uniform sample above it): 50,000 x 1,904 float32 is 380 MB.
FIT_SAMPLE = 50_000
# UMAP is fitted on fewer points (its neighbour graph and epochs grow faster than linearly).
UMAP_FIT_SAMPLE = 20_000
UMAP_PCA_DIMS = 50
METHODS = ("pca", "umap")
ZLIB_LEVEL = 1


@dataclass(frozen=True)
class Layout:
    """A pool's 2-D positions, row i for patch ``patch_ids[i]`` (ascending)."""

    patch_ids: np.ndarray  # int64
    slide_ids: np.ndarray  # int64
    xy: np.ndarray  # float32 (n, 2) in [-1, 1]
    method: str
    pool_digest: str


def pool_digest(patch_ids: np.ndarray) -> str:
    """A fingerprint of the pool's patch ids: a stored layout of the same pool need not be computed again."""
    return hashlib.sha256(np.ascontiguousarray(patch_ids, dtype="<i8").tobytes()).hexdigest()


def fit_sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Pool indices the layout is fitted on: all of them up to ``limit``, else a seeded sample, sorted."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, limit]).choice(n, limit, replace=False)).astype(np.int64)


def normalise(xy: np.ndarray) -> np.ndarray:
    """Centre on the middle of the bounding box and scale the longer side to [-1, 1] (aspect kept).
    The 0.5th and 99.5th percentiles bound it, so a few far outliers do not squash the rest into a dot;
    they are clipped to the edge."""
    xy = np.asarray(xy, dtype=np.float64)
    if not len(xy):
        return np.zeros((0, 2), dtype=np.float32)
    lo = np.percentile(xy, 0.5, axis=0)
    hi = np.percentile(xy, 99.5, axis=0)
    centre = (lo + hi) / 2
    half = float(np.max(hi - lo)) / 2
    scaled = (xy - centre) / (half if half > 0 else 1.0)
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def _project_all(rows: Rows, transform: Any, progress: ProgressFn | None, should_stop: StopFn | None) -> np.ndarray:
    out = np.empty((len(rows), 2), dtype=np.float64)
    done = 0
    for positions, block in rows.chunks():
        check_stop(should_stop, "map")
        out[positions] = transform(block)
        done += len(positions)
        report(progress, "map", 0.3 + 0.7 * done / max(1, len(rows)))
    return out


def compute_xy(
    rows: Rows,
    *,
    method: str = "pca",
    seed: int = 0,
    fit_limit: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """2-D positions (n, 2) float32 in [-1, 1] of every row of ``rows``, fitted on a bounded sample."""
    if method not in METHODS:
        raise LearnerError(f"Unknown map method {method!r}; use one of {', '.join(METHODS)}.")
    n = len(rows)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n < 3:
        return normalise(np.c_[np.arange(n, dtype=np.float64), np.zeros(n)])
    from sklearn.decomposition import PCA  # here, not at import: the web processes only unpack layouts

    limit = fit_limit or (UMAP_FIT_SAMPLE if method == "umap" else FIT_SAMPLE)
    sample = fit_sample(n, limit, seed)
    x_fit = rows.take(sample)
    report(progress, "map", 0.05)
    if method == "pca":
        pca = PCA(n_components=2, svd_solver="randomized", random_state=seed).fit(x_fit)
        del x_fit
        return normalise(_project_all(rows, pca.transform, progress, should_stop))
    try:
        import umap  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LearnerError("The umap map method needs the umap-learn package; use LEARNER MAP_METHOD=pca.") from exc
    dims = min(UMAP_PCA_DIMS, x_fit.shape[1], len(sample) - 1)
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(x_fit)
    reducer = umap.UMAP(n_components=2, n_neighbors=15, random_state=seed, low_memory=True)
    reducer.fit(pca.transform(x_fit))
    del x_fit
    report(progress, "map", 0.3)
    if len(sample) == n:
        return normalise(np.asarray(reducer.embedding_, dtype=np.float64))
    return normalise(_project_all(rows, lambda block: reducer.transform(pca.transform(block)), progress, should_stop))


# --- storage -------------------------------------------------------------------------------------------------------


def pack(layout: Layout) -> dict[str, Any]:
    """The EmbeddingMap fields of a layout (zlib-packed little-endian arrays)."""
    return {
        "n_points": len(layout.patch_ids),
        "method": layout.method,
        "pool_digest": layout.pool_digest,
        "patch_ids": zlib.compress(np.ascontiguousarray(layout.patch_ids, dtype="<i8").tobytes(), ZLIB_LEVEL),
        "slide_ids": zlib.compress(np.ascontiguousarray(layout.slide_ids, dtype="<i8").tobytes(), ZLIB_LEVEL),
        "xy": zlib.compress(np.ascontiguousarray(layout.xy, dtype="<f4").tobytes(), ZLIB_LEVEL),
    }


def unpack(patch_ids: bytes, slide_ids: bytes, xy: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patch ids, slide ids, xy (n, 2)) of a stored layout."""
    ids = np.frombuffer(zlib.decompress(bytes(patch_ids)), dtype="<i8")
    slides = np.frombuffer(zlib.decompress(bytes(slide_ids)), dtype="<i8")
    coords = np.frombuffer(zlib.decompress(bytes(xy)), dtype="<f4").reshape(len(ids), 2)
    return ids, slides, coords
