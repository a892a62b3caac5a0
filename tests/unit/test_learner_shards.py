"""How a pool's missing embeddings are cut into pieces and packed into shards (learner.shards)."""

from __future__ import annotations

import numpy as np
import pytest

from learner import shards


def test_a_large_slide_is_split_into_chunks_in_row_then_column_order() -> None:
    xy = np.array([[x, y] for y in (448, 0, 224) for x in (224, 0, 448)], dtype=np.int64)  # 9 patches, shuffled
    ids = np.arange(100, 109)
    pieces = shards.split("key", 7, 224, ids, xy, chunk_size=4)
    assert [len(p.idx) for p in pieces] == [4, 4, 1]
    assert [p.chunk for p in pieces] == [0, 1, 2]
    ordered = np.concatenate([p.xy for p in pieces])
    assert ordered.tolist() == sorted(xy.tolist(), key=lambda v: (v[1], v[0]))
    # Each piece's idx points at its own rows of the caller's arrays.
    for piece in pieces:
        assert (xy[piece.idx] == piece.xy).all()
    assert sorted(np.concatenate([p.idx for p in pieces]).tolist()) == list(range(9))


def piece(n: int, slide: int) -> shards.Piece:
    return shards.Piece(slide, 224, 0, f"k{slide}", np.arange(n), np.zeros((n, 2), dtype=np.int64))


def test_full_chunks_go_alone_and_small_slides_are_packed_up_to_the_chunk_size() -> None:
    packed = shards.pack([piece(4, 1), piece(1, 2), piece(1, 3), piece(2, 4), piece(3, 5), piece(4, 6)], 4)
    assert sorted([p.slide_id for p in s] for s in packed) == [[1], [2, 3, 4], [5], [6]]


def test_a_shard_holds_at_most_pieces_per_shard_slides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "PIECES_PER_SHARD", 3)
    packed = shards.pack([piece(1, s) for s in range(7)], 100)
    assert [len(s) for s in packed] == [3, 3, 1]
