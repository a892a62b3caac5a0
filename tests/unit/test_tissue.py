"""Tissue detection and the patch grid on hand-made arrays (no Django, milliseconds)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from annotations.domain import tissue

PINK = (200, 110, 170)  # eosin-ish
PURPLE = (90, 60, 150)  # haematoxylin-ish
WHITE = (245, 245, 245)


def slide_image(height: int, width: int, colour: tuple[int, int, int] = WHITE) -> np.ndarray:
    return np.full((height, width, 3), colour, dtype=np.uint8)


def noisy(image: np.ndarray, seed: int = 0, amount: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image.astype(int) + rng.integers(-amount, amount + 1, image.shape), 0, 255).astype(np.uint8)


def test_it_finds_no_tissue_on_a_white_background():
    image = noisy(slide_image(100, 120))
    mask = tissue.tissue_mask(image)
    assert not mask.any()
    assert tissue.patch_grid(mask, 1200, 1000, 100) == []


def test_it_finds_no_tissue_on_a_white_background_in_optical_density_either():
    mask = tissue.tissue_mask(noisy(slide_image(64, 64)), "od")
    assert not mask.any()


def test_it_covers_a_tissue_blob_with_patches_and_nothing_else():
    image = noisy(slide_image(100, 100))
    image[20:60, 40:80] = PINK  # level-0 (x10): x 400..800, y 200..600
    image[30:50, 50:70] = PURPLE
    mask = tissue.tissue_mask(image)
    grid = tissue.patch_grid(mask, 1000, 1000, 100)
    cells = {(p.x, p.y) for p in grid}
    assert cells == {(x, y) for x in range(400, 800, 100) for y in range(200, 600, 100)}
    assert all(p.size == 100 and p.tissue_fraction == 1.0 for p in grid)


def test_it_reports_partial_tissue_fractions_and_drops_background_patches():
    mask = np.zeros((10, 40), dtype=bool)
    mask[:, 0:10] = True  # patch 0: all tissue
    mask[:, 10:15] = True  # patch 1: half
    mask[:, 20:22] = True  # patch 2: a fifth, below the 0.25 default
    grid = tissue.patch_grid(mask, 400, 100, 100)
    assert [(p.x, p.tissue_fraction) for p in grid] == [(0, 1.0), (100, 0.5)]
    everything = tissue.patch_grid(mask, 400, 100, 100, min_fraction=0.0)
    assert [p.tissue_fraction for p in everything] == [1.0, 0.5, 0.2, 0.0]


def test_it_only_makes_whole_patches():
    mask = np.ones((25, 25), dtype=bool)
    grid = tissue.patch_grid(mask, 250, 250, 100)
    assert {(p.x, p.y) for p in grid} == {(0, 0), (100, 0), (0, 100), (100, 100)}


def test_it_gives_one_patch_for_an_image_smaller_than_a_patch_when_it_is_tissue():
    image = noisy(slide_image(150, 150, PINK))
    grid = tissue.patch_grid(tissue.tissue_mask(image), 150, 150, 224)
    assert len(grid) == 1
    assert (grid[0].x, grid[0].y, grid[0].size) == (0, 0, 224)
    assert grid[0].tissue_fraction == 1.0


def test_it_gives_no_patch_for_a_white_image_smaller_than_a_patch():
    image = noisy(slide_image(150, 150))
    assert tissue.patch_grid(tissue.tissue_mask(image), 150, 150, 224) == []


def test_it_gives_exactly_one_patch_for_an_image_of_exactly_one_patch():
    mask = np.ones((224, 224), dtype=bool)
    assert len(tissue.patch_grid(mask, 224, 224, 224)) == 1


def test_it_scales_the_patch_extent_from_project_to_slide_magnification():
    assert tissue.patch_extent(224, 40.0, 20.0) == 448
    assert tissue.patch_extent(224, 20.0, 20.0) == 224
    assert tissue.patch_extent(256, 20.0, 40.0) == 128
    assert tissue.patch_extent(224, None, 20.0) == 224


def test_it_treats_transparent_pixels_as_background():
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)  # transparent black, as openslide returns outside the scan
    rgba[:5, :, :3] = PINK
    rgba[:5, :, 3] = 255
    rgb = tissue.as_rgb(rgba)
    assert (rgb[5:] == 255).all()
    mask = tissue.tissue_mask(rgba, "od")
    assert mask[:5].all() and not mask[5:].any()


def test_it_accepts_greyscale_and_sixteen_bit_images():
    grey = np.zeros((8, 8, 1), dtype=np.uint16)
    grey[:4] = 4000
    rgb = tissue.as_rgb(grey)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[:4].min() == 255 and rgb[4:].max() == 0


def test_it_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="Unknown tissue detection method"):
        tissue.tissue_mask(slide_image(4, 4), "magic")  # type: ignore[arg-type]


def test_it_sizes_the_detection_image_to_the_patch():
    assert tissue.mask_size_for(500, 400, 224) == 500  # small slide: its own size
    assert tissue.mask_size_for(100_000, 80_000, 224) == 3572  # 8 px per patch
    assert tissue.mask_size_for(400_000, 80_000, 224) == 4096  # capped
    assert tissue.mask_size_for(5000, 4000, 448) == 1024  # at least 1024


def test_the_tissue_module_imports_no_django():
    code = (
        "import sys, annotations.domain.tissue; "
        "sys.exit(any(m.split('.')[0] in {'django', 'celery'} for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
