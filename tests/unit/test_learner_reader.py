"""Parallel patch readers: batches in the requested order with the pixels a serial read gives."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from annotations.slides import tiles
from learner.core.data import LazyImages, Reader, load_batch, read_batches, read_order
from learner.core.errors import LearnerError

REPO = Path(__file__).resolve().parents[2]
SLIDES = REPO.parent / "shared" / "data" / "slides"
CMU = SLIDES / "cmu-1-small-region.svs"  # JPEG tiles
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"  # JPEG 2000
SIDE = 96


def slide_patches(path: Path, n: int, seed: int) -> tuple[LazyImages, list[tuple[int, int]]]:
    """``n`` patch positions on a real slide in a shuffled order, read through the platform's region reader."""
    source = tiles.open_source(path)
    grid = [(x, y) for y in range(0, int(source.sizeY) - SIDE, 300) for x in range(0, int(source.sizeX) - SIDE, 300)]
    positions = random.Random(seed).sample(grid, n)

    def load(i: int) -> Image.Image:
        x, y = positions[i]
        return tiles.read_region(str(path), x, y, SIDE, SIDE, out_size=(SIDE, SIDE))

    return LazyImages(load, n, locality=lambda i: (positions[i][1], positions[i][0])), positions


@pytest.mark.parametrize("path", [CMU, TCGA], ids=["jpeg", "jpeg2000"])
@pytest.mark.parametrize("reader", [Reader("threads", 2), Reader("threads", 3, prefetch=1), Reader("processes", 2)])
def test_parallel_reader_returns_the_requested_patches_in_order(path: Path, reader: Reader) -> None:
    images, _ = slide_patches(path, 23, seed=len(path.name))
    chunks = [[5, 0, 17], [22, 3, 9, 11, 1], [2], [4, 6, 7, 8, 10, 12], [13, 14, 15, 16, 18, 19, 20, 21]]
    got = list(read_batches(images, chunks, SIDE, reader=reader))
    assert len(got) == len(chunks)
    for chunk, batch in zip(chunks, got, strict=True):
        expected = load_batch(images, chunk, SIDE)  # one at a time, in the calling thread
        assert batch.shape == (len(chunk), 3, SIDE, SIDE)
        assert torch.equal(batch, expected)
    # The patches really differ (tissue, not only background), so an out-of-order batch would have failed above.
    distinct = {image.numpy().tobytes() for batch in got for image in batch}
    assert len(distinct) >= 12


def test_processes_run_the_source_worker_init(tmp_path: Path) -> None:
    def mark() -> None:
        (tmp_path / f"worker-{os.getpid()}").touch()

    solid = [Image.new("RGB", (8, 8), (i, 255 - i, 7)) for i in range(0, 240, 20)]
    images = LazyImages(solid.__getitem__, len(solid), worker_init=mark)
    chunks = [[i, i + 1] for i in range(0, len(solid), 2)]
    got = torch.cat(list(read_batches(images, chunks, 8, reader=Reader("processes", 2))))
    assert torch.equal(got, load_batch(images, range(len(solid)), 8))
    workers = {p.name for p in tmp_path.iterdir()}
    assert len(workers) == 2 and f"worker-{os.getpid()}" not in workers


def test_read_order_follows_the_locality_key() -> None:
    images, positions = slide_patches(CMU, 12, seed=3)
    order = read_order(images, range(12))
    assert sorted(order) == list(range(12))
    assert [(positions[i][1], positions[i][0]) for i in order] == sorted((y, x) for x, y in positions)
    plain = LazyImages(lambda i: Image.new("RGB", (4, 4)), 5)
    assert read_order(plain, [3, 1, 4]) == [3, 1, 4]


def test_a_reader_stopped_early_decodes_no_further() -> None:
    loads: list[int] = []

    def load(i: int) -> Image.Image:
        loads.append(i)
        return Image.new("RGB", (8, 8), (i, 0, 0))

    images = LazyImages(load, 400)
    batches = read_batches(images, [list(range(i, i + 4)) for i in range(0, 400, 4)], 8, reader=Reader("threads", 2))
    first = next(batches)
    batches.close()  # type: ignore[attr-defined]
    assert first.shape[0] == 4
    assert len(loads) <= 4 * (Reader().prefetch + 2)


def test_bad_reader_settings_are_refused() -> None:
    with pytest.raises(LearnerError, match="Unknown patch reader"):
        Reader("gpu")  # type: ignore[arg-type]
    with pytest.raises(LearnerError, match="at least one worker"):
        Reader("threads", 0)
