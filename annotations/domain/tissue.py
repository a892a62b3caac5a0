"""Tissue detection on a low-resolution slide image, and the patch grid laid over it.

Pure numpy/scikit-image: callers pass an RGB ``uint8`` array of the whole slide at low
resolution and the slide's level-0 size, and get back plain dataclasses in level-0 pixels.

Detection is Otsu's threshold on a per-pixel stain signal:

- ``"saturation"`` (default): HSV saturation. Background glass is white or grey (low
  saturation), eosin and haematoxylin are strongly coloured. Black scanner borders and
  pen marks are low saturation too, so they are not mistaken for tissue.
- ``"od"``: optical density summed over RGB, -log10(I/255). Finds faint, pale tissue
  better but also counts dark non-tissue (black borders, dust).

Otsu always splits a histogram in two, even an almost uniform one; on an empty slide that
would call the brighter half of the glass "tissue". A floor on the threshold
(``min_saturation`` / ``min_od``) keeps glass and noise below it, so a blank slide yields
an empty mask rather than a mask of noise. The opposite failure, an image that is all tissue
(a patch-sized JPEG), would be split between its pale and dark stains; a ceiling on the threshold
(``max_saturation`` / ``max_od``, below the signal of pale eosin) keeps all of it as tissue. On
whole slides Otsu lands between floor and ceiling (0.24-0.28 saturation on the test slides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from skimage.filters import threshold_otsu

Method = Literal["saturation", "od"]

# Saturation of background glass on H&E scans is typically below 0.05; stained tissue above 0.1.
MIN_SATURATION = 0.07
MAX_SATURATION = 0.15
# Summed optical density of glass is ~0-0.1; pale eosin is ~0.3.
MIN_OD = 0.2
MAX_OD = 0.3
DEFAULT_MIN_FRACTION = 0.25


@dataclass(frozen=True)
class GridPatch:
    """One patch of the grid: its top-left corner and edge in level-0 pixels."""

    x: int
    y: int
    size: int
    tissue_fraction: float


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Coerce a greyscale, RGB or RGBA array (any integer or float dtype) to RGB uint8.

    Transparent pixels (alpha 0, e.g. outside a scanned area) become white background.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"Expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {array.shape}.")
    if array.dtype != np.uint8:
        is_float = array.dtype.kind == "f"
        values = array.astype(np.float64)
        top = float(values.max()) if values.size else 0.0
        if is_float and top <= 1.0:
            values = values * 255.0  # floats in [0, 1]
        elif top > 255:
            values = values * (255.0 / top)  # 16-bit or wider: stretch to the image's own range
        array = np.clip(values, 0, 255).astype(np.uint8)
    bands = array.shape[2]
    alpha = None
    if bands in (2, 4):
        alpha = array[:, :, -1]
        array = array[:, :, :-1]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if alpha is not None:
        array = array.copy()
        array[alpha == 0] = 255
    return np.ascontiguousarray(array)


def stain_signal(rgb: np.ndarray, method: Method = "saturation") -> np.ndarray:
    """Per-pixel signal (higher = more likely tissue) as float32 in [0, 1] (saturation) or OD units."""
    pixels = as_rgb(rgb).astype(np.float32)
    if method == "saturation":
        high = pixels.max(axis=2)
        low = pixels.min(axis=2)
        return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)
    if method == "od":
        return (-np.log10(np.maximum(pixels, 1.0) / 255.0)).sum(axis=2).astype(np.float32)
    raise ValueError(f"Unknown tissue detection method {method!r}; use 'saturation' or 'od'.")


def tissue_mask(
    rgb: np.ndarray,
    method: Method = "saturation",
    *,
    min_saturation: float = MIN_SATURATION,
    min_od: float = MIN_OD,
    max_saturation: float = MAX_SATURATION,
    max_od: float = MAX_OD,
) -> np.ndarray:
    """Boolean mask, True where the pixel is tissue."""
    signal = stain_signal(rgb, method)
    floor, ceiling = (min_saturation, max_saturation) if method == "saturation" else (min_od, max_od)
    if signal.size == 0:
        return np.zeros(signal.shape, dtype=bool)
    if float(signal.max()) <= floor:
        return np.zeros(signal.shape, dtype=bool)
    if float(signal.min()) == float(signal.max()):
        threshold = floor
    else:
        threshold = min(max(float(threshold_otsu(signal)), floor), ceiling)
    return signal > threshold


def patch_extent(patch_size: int, slide_magnification: float | None, project_magnification: float) -> int:
    """Edge of a patch in level-0 pixels: patch_size scaled from the project's to the slide's objective.

    A slide of unknown magnification is taken at face value (extent = patch_size).
    """
    if not slide_magnification or slide_magnification <= 0:
        return int(patch_size)
    return max(1, round(patch_size * slide_magnification / project_magnification))


def patch_grid(
    mask: np.ndarray,
    slide_width: int,
    slide_height: int,
    extent: int,
    *,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> list[GridPatch]:
    """Non-overlapping patches of ``extent`` level-0 pixels whose tissue fraction is >= ``min_fraction``.

    ``mask`` covers the whole slide at any (lower) resolution. The grid starts at (0, 0) and only
    holds whole patches, except that a slide smaller than one patch along an axis gets one patch
    there (its fraction counts only the part of the patch inside the slide).
    """
    if slide_width <= 0 or slide_height <= 0 or extent <= 0:
        raise ValueError("Slide size and patch extent must be positive.")
    mask = np.asarray(mask, dtype=bool)
    mask_h, mask_w = mask.shape
    if mask_h == 0 or mask_w == 0:
        return []
    # Summed-area table with a zero row/column: the sum over rows [r0, r1) and cols [c0, c1) is
    # table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0].
    table = np.zeros((mask_h + 1, mask_w + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    scale_x = mask_w / slide_width
    scale_y = mask_h / slide_height

    columns = max(1, slide_width // extent)
    rows = max(1, slide_height // extent)
    xs = np.arange(columns, dtype=np.int64) * extent
    ys = np.arange(rows, dtype=np.int64) * extent
    c0, c1 = _mask_spans(xs, extent, slide_width, scale_x, mask_w)
    r0, r1 = _mask_spans(ys, extent, slide_height, scale_y, mask_h)

    sums = (
        table[r1[:, None], c1[None, :]]
        - table[r0[:, None], c1[None, :]]
        - table[r1[:, None], c0[None, :]]
        + table[r0[:, None], c0[None, :]]
    )
    areas = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    fractions = sums / areas
    keep_rows, keep_cols = np.nonzero(fractions >= min_fraction)
    return [
        GridPatch(x=int(xs[col]), y=int(ys[row]), size=extent, tissue_fraction=round(float(fractions[row, col]), 4))
        for row, col in zip(keep_rows, keep_cols, strict=True)
    ]


def _mask_spans(
    starts: np.ndarray, extent: int, limit: int, scale: float, mask_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask index ranges [lo, hi) covered by level-0 spans [start, min(start + extent, limit)); never empty."""
    lo = np.floor(starts * scale).astype(np.int64)
    hi = np.ceil(np.minimum(starts + extent, limit) * scale).astype(np.int64)
    lo = np.clip(lo, 0, mask_len - 1)
    hi = np.clip(np.maximum(hi, lo + 1), 1, mask_len)
    return lo, hi


def mask_size_for(slide_width: int, slide_height: int, extent: int, *, pixels_per_patch: int = 8) -> int:
    """Longest edge of the low-resolution image to detect tissue on.

    Enough resolution that a patch spans ``pixels_per_patch`` mask pixels, at least 1024 px
    (or the slide itself when smaller), never more than 4096 px.
    """
    longest = max(slide_width, slide_height)
    wanted = math.ceil(longest * pixels_per_patch / max(extent, 1))
    return int(min(longest, max(1024, min(wanted, 4096))))
