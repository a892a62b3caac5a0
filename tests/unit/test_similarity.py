"""The nearest-neighbour index on its own: the IVF path (pools of 20,000 rows and more), saved and loaded
memory-mapped as web processes load it, against the exact neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learner.core import similarity
from learner.core.embedding_store import ArrayRows


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (50, dim)).astype(np.float32)
    return (centres[rng.integers(0, 50, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def test_an_ivf_index_loaded_memory_mapped_finds_nearly_all_exact_neighbours(tmp_path: Path) -> None:
    rows = ArrayRows(clustered(similarity.FLAT_BELOW + 5_000, 48, seed=0))
    built = similarity.build(rows, seed=0, chunk=4_096)
    assert built.index.ntotal == len(rows) and built.index.__class__.__name__ == "IndexIVFFlat"
    built.save(tmp_path / "i.faiss")
    loaded = similarity.SimilarityIndex.load(tmp_path / "i.faiss")
    queries = np.arange(0, len(rows), 1_250)
    truth, _ = similarity.exact_neighbours(rows, queries, 20)
    hits = []
    for q, true in zip(queries.tolist(), truth, strict=True):
        found, dist = loaded.search_row(q, 20)
        assert q not in found.tolist() and len(found) == 20
        assert np.all(np.diff(dist) >= -1e-6)
        hits.append(len(set(found.tolist()) & set(true.tolist())) / 20)
    assert np.mean(hits) >= 0.9, np.mean(hits)


def test_k_is_bounded_by_the_pool_and_an_empty_pool_is_refused() -> None:
    rows = ArrayRows(clustered(12, 8, seed=1))
    index = similarity.build(rows)
    found, _ = index.search_row(3, 100)
    assert sorted(found.tolist()) == [i for i in range(12) if i != 3]
    with pytest.raises(ValueError, match="Nothing to index"):
        similarity.build(ArrayRows(np.zeros((0, 8), dtype=np.float32)))
