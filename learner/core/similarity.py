"""Nearest neighbours in embedding space ("more like this"): a faiss index over PCA-reduced, unit-length
embeddings, built from a pool's ``Rows`` chunk by chunk and saved as one file.

Why faiss IVF-Flat on PCA and not pgvector or HNSW: the machine's (and CI's) PostgreSQL 15 has no pgvector,
so it cannot be the only path; faiss-cpu ships wheels (hnswlib only a source archive to compile), and
``tests/bench/bench_similar.py`` compares IVF-Flat with faiss HNSW at 100k and 1M (build time, memory,
query median/p95, recall@100). IVF-Flat keeps its vectors as flat inverted lists that
``faiss.read_index(..., IO_FLAG_MMAP)`` maps instead of reading, so web processes share one copy in the
page cache, and it builds in a k-means plus one pass over the pool.

Distances are cosine distances (1 - cos) of the full vectors as the reduced ones estimate them: vectors are
made unit length before PCA, so the squared L2 distance in the reduced space is about twice the cosine
distance. A pool below ``FLAT_BELOW`` rows gets an exact (flat) index in the reduced space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import scipy.linalg

from .embedding_store import CHUNK_ROWS, Rows

# Reduced dimension: 1,904-d features keep most of their neighbourhoods in 128 (bench_similar.py).
PCA_DIM = 128
# PCA is fitted on at most this many rows and the coarse quantiser trained on at most TRAIN_SAMPLE (seeded
# samples): a 16,384-row covariance of 1,904-d vectors and its top eigenvectors take seconds.
PCA_SAMPLE = 16_384
TRAIN_SAMPLE = 100_000
# Below this many rows the index is flat (exact in the reduced space): an IVF would gain nothing.
FLAT_BELOW = 20_000
# Inverted lists probed per query; with about sqrt(n) lists this scans ~nprobe * sqrt(n) vectors.
NPROBE = 48
MAX_LISTS = 4096


def _unit(x: np.ndarray) -> np.ndarray:
    """A unit-length copy (never in place: the rows may be a read-only memory map of the store)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


@dataclass(frozen=True)
class Pca:
    """Mean and top principal axes (rows) of unit-length vectors."""

    mean: np.ndarray  # (d_in,)
    axes: np.ndarray  # (d_out, d_in)

    @classmethod
    def fit(cls, unit_vectors: np.ndarray, dim: int) -> Pca:
        """The top ``dim`` axes from the covariance's eigenvectors (a subset solve: seconds, not minutes)."""
        x = np.asarray(unit_vectors, dtype=np.float32)
        mean = x.mean(axis=0)
        centred = x - mean
        cov = (centred.T @ centred).astype(np.float64)
        d_in = cov.shape[0]
        dim = int(min(dim, d_in))
        _, vecs = scipy.linalg.eigh(cov, subset_by_index=[d_in - dim, d_in - 1], driver="evr")
        return cls(mean=mean.astype(np.float32), axes=np.ascontiguousarray(vecs[:, ::-1].T, dtype=np.float32))

    def apply(self, unit_vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((unit_vectors - self.mean) @ self.axes.T, dtype=np.float32)


@dataclass
class SimilarityIndex:
    """A built index: the PCA transform, the faiss index over reduced vectors (row i is pool row i)."""

    pca: Pca
    index: faiss.Index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def reduce(self, vectors: np.ndarray) -> np.ndarray:
        return self.pca.apply(_unit(vectors))

    def vector(self, row: int) -> np.ndarray:
        """The reduced vector stored for row ``row`` (IVF lists keep a direct map to find it)."""
        return np.asarray(self.index.reconstruct(int(row)), dtype=np.float32).reshape(1, -1)

    def search_row(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosine distances) of the ``k`` nearest other rows to row ``row``, nearest first."""
        return self.search(self.vector(row), k, exclude=row)

    def search(self, query: np.ndarray, k: int, *, exclude: int = -1) -> tuple[np.ndarray, np.ndarray]:
        k = max(0, min(int(k), self.ntotal - (1 if exclude >= 0 else 0)))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = min(NPROBE, self.index.nlist)
        dist, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k + 1)
        keep = (rows[0] >= 0) & (rows[0] != exclude)
        return rows[0][keep][:k].astype(np.int64), (dist[0][keep][:k] / 2.0).astype(np.float32)

    def save(self, path: Path) -> None:
        """Write the index to ``path`` and the PCA beside it (``<path>.pca``); the caller replaces atomically."""
        faiss.write_index(self.index, str(path))
        with open(str(path) + ".pca", "wb") as fh:
            np.savez(fh, mean=self.pca.mean, axes=self.pca.axes)

    @classmethod
    def load(cls, path: Path, *, mmap: bool = True) -> SimilarityIndex:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(path), flags)
        with np.load(str(path) + ".pca") as npz:
            pca = Pca(mean=npz["mean"], axes=npz["axes"])
        return cls(pca=pca, index=index)


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def n_lists(n: int) -> int:
    """About sqrt(n) inverted lists (each holds ~sqrt(n) vectors), at most MAX_LISTS."""
    return int(min(MAX_LISTS, max(1, round(np.sqrt(n)))))


def build(rows: Rows, *, dim: int = PCA_DIM, seed: int = 0, chunk: int = CHUNK_ROWS) -> SimilarityIndex:
    """Index every row of ``rows`` (row i of the index is pool row i)."""
    n = len(rows)
    if n == 0:
        raise ValueError("Nothing to index: the pool has no embeddings.")
    pca = Pca.fit(_unit(rows.take(_sample(n, PCA_SAMPLE, seed))), min(dim, max(1, n - 1)))
    d_out = int(pca.axes.shape[0])
    index: faiss.Index
    if n < FLAT_BELOW:
        index = faiss.IndexFlatL2(d_out)
    else:
        train_rows = _sample(n, TRAIN_SAMPLE, seed + 1)
        reduced_train = np.concatenate(
            [pca.apply(_unit(rows.take(train_rows[i : i + chunk]))) for i in range(0, len(train_rows), chunk)]
        )
        index = faiss.index_factory(d_out, f"IVF{n_lists(n)},Flat", faiss.METRIC_L2)  # owns its quantiser
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.train(reduced_train)
        ivf.make_direct_map()  # row -> its place in the lists, kept as rows are added: reconstruct() needs it
        del reduced_train
    for _, block in rows.chunks(size=chunk):
        index.add(pca.apply(_unit(block)))
    return SimilarityIndex(pca=pca, index=index)


def exact_neighbours(rows: Rows, query_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The true ``k`` nearest other rows (cosine on the full vectors) of each query row: the yardstick
    tests and the benchmark measure recall against. Reads ``rows`` chunk by chunk."""
    queries = _unit(rows.take(query_rows))
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for positions, block in rows.chunks():
        d = 1.0 - queries @ _unit(block).T
        d[np.asarray(query_rows)[:, None] == positions[None, :]] = np.inf
        best_d = np.concatenate([best_d, d.astype(np.float32)], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(positions, d.shape)], axis=1)
        if best_d.shape[1] > k:
            top = np.argpartition(best_d, k - 1, axis=1)[:, :k]
            best_d = np.take_along_axis(best_d, top, axis=1)
            best_i = np.take_along_axis(best_i, top, axis=1)
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_d, order, axis=1)
