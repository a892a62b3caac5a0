"""Embedding extraction: on-disk cache, dihedral TTA, progress and cancellation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learner.core.backbone import Backbone, create_backbone
from learner.core.data import LazyImages
from learner.core.embeddings import EmbeddingCache, embed
from learner.core.errors import Cancelled, LearnerError

REPO = Path(__file__).resolve().parents[2]
LUNG = REPO.parent / "shared" / "data" / "lc25000_lung" / "lung_image_sets"
SIZE = 64  # small images keep these tests fast; the cache logic does not care


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return create_backbone()


def patches(n: int) -> list[Image.Image]:
    files = sorted((LUNG / "lung_aca").glob("*.jpeg"))[:n] if LUNG.is_dir() else []
    if len(files) == n:
        return [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(0)  # without the shared data: textured noise is enough for cache logic
    return [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(n)]


class Counting:
    """A LazyImages whose loads are counted, to see what the cache spared."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images
        self.loads = 0
        self.source = LazyImages(self.load, len(images))

    def load(self, i: int) -> Image.Image:
        self.loads += 1
        return self.images[i]


def test_second_pass_comes_from_the_cache_without_loading_images(backbone: Backbone, tmp_path: Path) -> None:
    imgs = Counting(patches(6))
    keys = [f"slide-1/{i}" for i in range(6)]
    first = embed(backbone, imgs.source, keys=keys, cache_dir=tmp_path, image_size=SIZE, batch_size=4)
    assert first.shape == (6, 1280) and first.dtype == np.float32
    assert imgs.loads == 6
    again = embed(backbone, imgs.source, keys=keys, cache_dir=tmp_path, image_size=SIZE, batch_size=4)
    assert imgs.loads == 6
    np.testing.assert_array_equal(first, again)
    # a different image size is a different cache entry
    embed(backbone, imgs.source, keys=keys, cache_dir=tmp_path, image_size=SIZE + 32, batch_size=4)
    assert imgs.loads == 12
    assert len(list(tmp_path.rglob("*.npy"))) == 12
    assert not list(tmp_path.rglob("*.tmp"))


def test_cancelled_pass_raises_and_keeps_finished_batches(backbone: Backbone, tmp_path: Path) -> None:
    imgs = Counting(patches(6))
    keys = [f"k{i}" for i in range(6)]
    seen: list[tuple[str, float]] = []

    def progress(stage: str, fraction: float) -> None:
        seen.append((stage, fraction))

    with pytest.raises(Cancelled):
        embed(
            backbone,
            imgs.source,
            keys=keys,
            cache_dir=tmp_path,
            image_size=SIZE,
            batch_size=2,
            progress=progress,
            should_stop=lambda: len(seen) >= 2,  # stop after the first batch was reported
        )
    assert imgs.loads == 2
    done = embed(backbone, imgs.source, keys=keys, cache_dir=tmp_path, image_size=SIZE, batch_size=2)
    assert imgs.loads == 2 + 4  # only the unfinished items were computed
    assert done.shape == (6, 1280)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and {s for s, _ in seen} == {"embed"}


def test_progress_reaches_one(backbone: Backbone) -> None:
    seen: list[float] = []
    embed(backbone, patches(3), image_size=SIZE, batch_size=2, progress=lambda s, f: seen.append(f))
    assert seen[-1] == 1.0


def test_tta_embedding_is_invariant_to_rotating_and_flipping_the_patch(backbone: Backbone) -> None:
    img = patches(1)[0].resize((SIZE, SIZE))  # resizing after rotating would not commute exactly (uint8 passes)
    turned = img.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain = embed(backbone, [img, turned], image_size=SIZE)
    tta = embed(backbone, [img, turned], image_size=SIZE, tta=True)
    # averaged over the dihedral group, the embedding cannot tell the two apart; without TTA it can
    assert np.abs(tta[0] - tta[1]).max() < 1e-3 * np.abs(tta[0]).max()
    assert np.abs(plain[0] - plain[1]).max() > 1e-2 * np.abs(plain[0]).max()


def test_cache_needs_keys_one_per_image(backbone: Backbone, tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match="key per image"):
        embed(backbone, patches(2), cache_dir=tmp_path, image_size=SIZE)
    with pytest.raises(LearnerError, match="Got 1 keys for 2 images"):
        embed(backbone, patches(2), keys=["a"], cache_dir=tmp_path, image_size=SIZE)


def test_a_corrupt_cache_file_is_recomputed(backbone: Backbone, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    imgs = Counting(patches(1))
    first = embed(backbone, imgs.source, keys=["x"], cache_dir=tmp_path, image_size=SIZE)
    (path,) = tmp_path.rglob("*.npy")
    path.write_bytes(b"truncated")
    assert cache.get(path.parent.parent.name, "x") is None
    again = embed(backbone, imgs.source, keys=["x"], cache_dir=tmp_path, image_size=SIZE)
    assert imgs.loads == 2
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-5)
