"""The per-slide embedding store and pools read from it in chunks, on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from learner.core.backbone import Backbone, Normalisation
from learner.core.config import BackboneSpec, TrainConfig
from learner.core.embedding_store import CHUNK_ROWS, ArrayRows, EmbeddingStore, SlideRows
from learner.core.training import self_train_head, train_head

DIM = 4


def store(tmp_path: Path) -> EmbeddingStore:
    return EmbeddingStore(tmp_path, "model-a", DIM)


def vectors(n: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + offset) / 10


def test_a_slide_written_once_is_found_by_position_and_unknown_positions_are_misses(tmp_path: Path) -> None:
    s = store(tmp_path)
    xy = np.array([[0, 0], [224, 0], [0, 224]])
    s.put_slide("abc-224-224", xy, vectors(3))
    rows = s.lookup("abc-224-224", np.array([[0, 224], [448, 448], [0, 0]]))
    assert rows.tolist() == [2, -1, 0]
    assert s.lookup("other-224-224", xy).tolist() == [-1, -1, -1]
    on_disk = np.load(s.vectors_path("abc-224-224"), mmap_mode="r")
    np.testing.assert_array_equal(on_disk[rows[2]], vectors(3)[0])


def test_adding_patches_to_a_slide_keeps_the_rows_already_there(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put_slide("abc", np.array([[0, 0], [1, 0]]), vectors(2))
    # one position again (with another value: the stored one stands), one new, one new given twice
    s.put_slide("abc", np.array([[1, 0], [2, 0], [3, 0], [3, 0]]), vectors(4, offset=100))
    rows = s.lookup("abc", np.array([[0, 0], [1, 0], [2, 0], [3, 0]]))
    assert rows.tolist() == [0, 1, 2, 3]
    on_disk = np.load(s.vectors_path("abc"))
    np.testing.assert_array_equal(on_disk[:2], vectors(2))
    np.testing.assert_array_equal(on_disk[2], vectors(4, offset=100)[1])
    np.testing.assert_array_equal(on_disk[3], vectors(4, offset=100)[2])


def test_a_writer_stopped_between_its_two_replaces_leaves_the_slide_as_it_was_and_the_next_write_keeps_it(
    tmp_path: Path,
) -> None:
    """Two chunks of one slide are written by two processes: a reader in the middle of one's write (or after
    a writer killed there) must see the rows already there, not take the whole slide as missing and embed
    it again, and the next writer must not drop them."""
    s = store(tmp_path)
    s.put_slide("abc", np.array([[0, 0], [1, 0]]), vectors(2))
    # the vectors of a third position replaced, the positions not yet
    np.save(s.vectors_path("abc"), np.concatenate([vectors(2), vectors(1, offset=7)]))
    assert s.lookup("abc", np.array([[1, 0], [0, 0], [2, 0]])).tolist() == [1, 0, -1]
    assert s.put_slide("abc", np.array([[5, 0], [0, 0]]), vectors(2, offset=50)) == 1
    assert s.lookup("abc", np.array([[0, 0], [1, 0], [5, 0]])).tolist() == [0, 1, 2]
    on_disk = np.load(s.vectors_path("abc"))
    assert on_disk.shape == (3, DIM)
    np.testing.assert_array_equal(on_disk[:2], vectors(2))
    np.testing.assert_array_equal(on_disk[2], vectors(2, offset=50)[0])


def test_a_slide_whose_files_disagree_reads_as_missing(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put_slide("abc", np.array([[0, 0], [1, 0]]), vectors(2))
    # damage: more positions than vectors (a writer replaces the vectors first, so no write leaves this)
    np.save(s.vectors_path("abc").with_suffix(".xy.npy"), np.array([[0, 0], [1, 0], [2, 0]]))
    assert s.lookup("abc", np.array([[0, 0]])).tolist() == [-1]
    # and another embedding size is a miss too, never a wrongly shaped hit
    assert EmbeddingStore(tmp_path, "model-a", DIM + 1).lookup("abc", np.array([[0, 0]])).tolist() == [-1]


def test_a_vectors_file_cut_short_or_of_another_dtype_reads_as_missing(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put_slide("abc", np.array([[0, 0], [1, 0]]), vectors(2))
    path = s.vectors_path("abc")
    whole = path.read_bytes()
    path.write_bytes(whole[:-4])  # the header is intact, the last float is gone (a disk that filled up)
    assert s.lookup("abc", np.array([[0, 0], [1, 0]])).tolist() == [-1, -1]
    np.save(path, vectors(2).astype(np.float64))
    assert s.lookup("abc", np.array([[0, 0]])).tolist() == [-1]
    path.write_bytes(whole)
    assert s.lookup("abc", np.array([[0, 0], [1, 0]])).tolist() == [0, 1]


def test_small_slide_files_are_read_whole_and_large_ones_mapped_with_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learner.core import embedding_store

    pool, expected = two_slide_pool(tmp_path)
    idx = np.array([6, 0, 3, 3, 5])
    opened: list[bool] = []
    real_load = np.load

    def spy(path, mmap_mode=None):  # type: ignore[no-untyped-def]
        opened.append(mmap_mode is not None)
        return real_load(path, mmap_mode=mmap_mode)

    monkeypatch.setattr(embedding_store.np, "load", spy)
    np.testing.assert_array_equal(pool.take(idx), expected[idx])
    assert opened == []  # a few bytes each: read whole and parsed here, neither mapped nor handed to np.load
    monkeypatch.setattr(embedding_store, "SMALL_FILE_BYTES", 0)
    opened.clear()
    np.testing.assert_array_equal(pool.take(idx), expected[idx])
    assert opened == [True, True]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.zeros((0, 4), dtype=np.float32),
        np.array([[1, 2], [3, -4]], dtype=np.int64),
        np.arange(5, dtype=">f4"),  # another byte order
        np.arange(24, dtype=np.int32).reshape(2, 3, 4),
        np.array(3.5, dtype=np.float64),  # no dimensions at all
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),  # a header numpy must read
        np.array(["a", "bc"]),  # a dtype the fast path does not parse
    ],
)
def test_a_file_read_whole_is_the_array_numpy_saved(tmp_path: Path, array: np.ndarray) -> None:
    from learner.core.embedding_store import _array_header, _parse_npy

    path = tmp_path / "a.npy"
    np.save(path, array)
    got = _parse_npy(path.read_bytes(), path)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert _array_header(path) == (array.shape, array.dtype)


def test_a_file_with_more_rows_declared_than_it_holds_is_refused_read_whole_or_by_header(tmp_path: Path) -> None:
    from learner.core.embedding_store import _array_header, _parse_npy

    path = tmp_path / "a.npy"
    np.save(path, vectors(3))
    whole = path.read_bytes()
    for cut in (whole[:-1], whole.replace(b"(3, 4)", b"(4, 4)")):
        path.write_bytes(cut)
        with pytest.raises(ValueError, match="truncated"):
            _parse_npy(cut, path)
        with pytest.raises(ValueError, match="truncated"):
            _array_header(path)
    path.write_bytes(b"not an array at all")
    with pytest.raises(ValueError):
        _parse_npy(path.read_bytes(), path)


def test_it_refuses_vectors_that_do_not_match_the_positions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected 2 vectors of 4 features"):
        store(tmp_path).put_slide("abc", np.array([[0, 0], [1, 0]]), vectors(3))


def two_slide_pool(tmp_path: Path) -> tuple[SlideRows, np.ndarray]:
    """A pool of 7 patches over two slide files, interleaved, and the array it stands for."""
    s = store(tmp_path)
    a, b = vectors(3), vectors(4, offset=50)
    s.put_slide("a", np.array([[i, 0] for i in range(3)]), a)
    s.put_slide("b", np.array([[i, 0] for i in range(4)]), b)
    seg = np.array([1, 0, 1, 0, 1, 1, 0], dtype=np.int32)
    row = np.array([3, 0, 0, 2, 1, 2, 1], dtype=np.int64)
    expected = np.stack([(a, b)[g][r] for g, r in zip(seg, row, strict=True)])
    return SlideRows([s.vectors_path("a"), s.vectors_path("b")], seg, row, DIM), expected


def test_a_pool_over_slide_files_gives_rows_in_the_order_asked(tmp_path: Path) -> None:
    pool, expected = two_slide_pool(tmp_path)
    idx = np.array([6, 0, 3, 3, 5])
    np.testing.assert_array_equal(pool.take(idx), expected[idx])
    np.testing.assert_array_equal(pool.subset(np.array([2, 4])).take(np.array([1, 0])), expected[[4, 2]])
    np.testing.assert_array_equal(pool.in_memory().array, expected)


def test_chunks_cover_every_row_once_and_never_exceed_their_size(tmp_path: Path) -> None:
    pool, expected = two_slide_pool(tmp_path)
    seen = np.zeros(len(pool), dtype=int)
    for positions, rows in pool.chunks(size=3):
        assert len(positions) <= 3
        np.testing.assert_array_equal(rows, expected[positions])
        seen[positions] += 1
    assert seen.tolist() == [1] * 7
    idx = np.array([5, 1, 2])
    for positions, rows in pool.chunks(idx, size=2):
        np.testing.assert_array_equal(rows, expected[idx[positions]])


def test_an_array_in_memory_is_one_chunk() -> None:
    array = vectors(5)
    chunks = list(ArrayRows(array).chunks(size=2))
    assert len(chunks) == 1 and chunks[0][0].tolist() == [0, 1, 2, 3, 4]


def toy_backbone() -> Backbone:
    return Backbone(nn.Identity(), BackboneSpec(), "toy", Normalisation((0.5,) * 3, (0.5,) * 3), DIM)


def test_self_training_caps_its_pseudo_labels_and_reads_a_slide_pool_like_an_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[4, 0, 0, 0], [0, 4, 0, 0]], dtype=np.float32)
    labels = np.array([0, 1] * 10)
    x = centres[labels] + rng.normal(0, 0.5, (20, DIM)).astype(np.float32)
    pool_labels = rng.integers(0, 2, 400)
    unlabelled = centres[pool_labels] + rng.normal(0, 0.5, (400, DIM)).astype(np.float32)
    s = store(tmp_path)
    s.put_slide("a", np.array([[i, 0] for i in range(250)]), unlabelled[:250])
    s.put_slide("b", np.array([[i, 0] for i in range(150)]), unlabelled[250:])
    seg = np.array([0] * 250 + [1] * 150, dtype=np.int32)
    row = np.concatenate([np.arange(250), np.arange(150)])
    on_disk = SlideRows([s.vectors_path("a"), s.vectors_path("b")], seg, row, DIM)
    config = TrainConfig(seed=3)
    names, sure = ["a", "b"], 0.6  # a strongly regularised head on 20 labels is seldom 95% sure

    free = self_train_head(x, labels, unlabelled, names, toy_backbone(), config, threshold=sure)
    assert free.extra["pseudo_labels"] > 100  # well-separated clusters: most of the pool is sure
    from_disk = self_train_head(x, labels, on_disk, names, toy_backbone(), config, threshold=sure)
    assert from_disk.extra["pseudo_labels"] == free.extra["pseudo_labels"]
    np.testing.assert_allclose(from_disk.predict_proba(x), free.predict_proba(x), atol=1e-5)

    kwargs = {"threshold": sure, "max_pseudo_labels": 50}
    capped = self_train_head(x, labels, on_disk, names, toy_backbone(), config, **kwargs)  # type: ignore[arg-type]
    assert capped.extra["pseudo_labels"] == 50 and capped.extra["n_train"] == 20
    again = self_train_head(x, labels, on_disk, names, toy_backbone(), config, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.predict_proba(x), capped.predict_proba(x))  # the sample is seeded


def test_a_head_fitted_on_slide_rows_is_the_one_fitted_on_the_same_array(tmp_path: Path) -> None:
    n = CHUNK_ROWS + 3000  # two chunks
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, n)
    x = (rng.normal(0, 1, (n, DIM)) + y[:, None]).astype(np.float32)
    s = store(tmp_path)
    s.put_slide("a", np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1), x)
    order = np.arange(n)[::-1].copy()  # pool index i is file row n-1-i: read by file order, out of pool order
    rows = SlideRows([s.vectors_path("a")], np.zeros(n, dtype=np.int32), order, DIM)
    config = TrainConfig(seed=1)
    in_memory = train_head(x[order], y[order], ["a", "b"], toy_backbone(), config)
    from_disk = train_head(rows, y[order], ["a", "b"], toy_backbone(), config)
    np.testing.assert_array_equal(from_disk.predict_proba(x[:500]), in_memory.predict_proba(x[:500]))


def test_a_slide_asked_for_in_its_file_order_or_another_finds_the_same_rows(tmp_path: Path) -> None:
    s = store(tmp_path)
    xy = np.array([[0, 0], [224, 0], [0, 224], [224, 224]])
    s.put_slide("abc", xy, vectors(4))
    assert s.lookup("abc", xy).tolist() == [0, 1, 2, 3]
    assert s.lookup("abc", xy[::-1]).tolist() == [3, 2, 1, 0]
    assert s.lookup("abc", xy[:3]).tolist() == [0, 1, 2]
    assert s.lookup("abc", np.array([[0, 0], [224, 0], [0, 224], [9, 9]])).tolist() == [0, 1, 2, -1]


def test_a_pool_of_one_patch_slides_named_by_string_reads_each_slides_row(tmp_path: Path) -> None:
    s = store(tmp_path)
    keys = [f"slide-{i}" for i in range(5)]
    for i, key in enumerate(keys):
        s.put_slide(key, np.array([[i, 0]]), vectors(1, offset=100 * i))
        assert s.lookup(key, np.array([[i, 0]])).tolist() == [0]
    assert str(s.vectors_path(keys[0])) == s.vectors_file(keys[0])
    pool = SlideRows([s.vectors_file(k) for k in keys], np.arange(5, dtype=np.int32), np.zeros(5, dtype=np.int64), DIM)
    idx = np.array([4, 0, 2, 2])
    expected = np.concatenate([vectors(1, offset=100 * int(i)) for i in idx])
    np.testing.assert_array_equal(pool.take(idx), expected)
