"""Reading pixels from slides: the tile source cache, pyramid geometry, tiles, regions and patches.

Tile scheme (what the viewer builds on): large-image's z/x/y pyramid.

- ``GET /api/v1/slides/{id}/tilesource`` returns JSON for an OpenSeadragon custom tile source::

      {"width": 4443, "height": 3567, "tileWidth": 256, "tileHeight": 256, "tileSize": 256,
       "tileOverlap": 0, "minLevel": 0, "maxLevel": 5, "levels": 6,
       "tileUrlTemplate": "/api/v1/slides/7/tiles/{z}/{x}/{y}.jpeg", ...}

  and in JavaScript::

      new OpenSeadragon.TileSource({...info, getTileUrl: (level, x, y) =>
          info.tileUrlTemplate.replace("{z}", level).replace("{x}", x).replace("{y}", y)})

- ``GET /api/v1/slides/{id}/tiles/{z}/{x}/{y}.jpeg``: z = 0 is the whole slide shrunk into one tile,
  z = levels - 1 is full resolution (level 0 of the slide); each step doubles the resolution,
  which is exactly OpenSeadragon's level numbering with ``minLevel = 0, maxLevel = levels - 1``.
  Tiles are ``tileWidth`` x ``tileHeight`` except at the right and bottom edges, where they are
  cropped to the image (so OpenSeadragon draws them undistorted). Tile sizes can differ from 256
  and need not be square (a strip-organised TIFF has e.g. 1493 x 256 tiles).

Sources are opened through ``large_image.open`` with fixed arguments, so large-image's own source
cache hands every request (and every thread) in a process the same open source.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import large_image
import numpy as np
from large_image.constants import TILE_FORMAT_NUMPY
from large_image.exceptions import TileSourceError, TileSourceXYZRangeError
from PIL import Image

from annotations.domain.tissue import as_rgb

if TYPE_CHECKING:
    from large_image.tilesource import TileSource

    from annotations.models import Patch

JPEG_QUALITY = 90
THUMBNAIL_SIZE = 512
MAX_REGION_SIZE = 4096
# The PIL source refuses larger plain images by default (4096); a 10k x 10k RGB PNG is ~300 MB decoded.
MAX_SMALL_IMAGE_SIZE = 10_000
# Bump when tile encoding changes, so browsers holding "immutable" tiles fetch the new ones.
ENCODING_VERSION = "1"

large_image.config.setConfig("max_small_image_size", MAX_SMALL_IMAGE_SIZE)


class SlideReadError(Exception):
    """The slide file cannot be read; the message is a sentence for the user."""


class TileNotFound(Exception):
    """The requested tile, level or region does not exist."""


@dataclass(frozen=True)
class Pyramid:
    """Geometry of a slide's z/x/y tile pyramid (z = levels - 1 is full resolution)."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    levels: int

    def level_size(self, z: int) -> tuple[int, int]:
        scale = 2 ** (self.levels - 1 - z)
        # Floor, as large-image does when it decides which tiles a level has.
        return max(1, self.width // scale), max(1, self.height // scale)

    def tile_counts(self, z: int) -> tuple[int, int]:
        width, height = self.level_size(z)
        return math.ceil(width / self.tile_width), math.ceil(height / self.tile_height)

    def has_tile(self, z: int, x: int, y: int) -> bool:
        if not 0 <= z < self.levels or x < 0 or y < 0:
            return False
        columns, rows = self.tile_counts(z)
        return x < columns and y < rows


def open_source(path: str | Path) -> TileSource:
    """The process-wide cached tile source for a slide file (JPEG tiles, edge tiles cropped)."""
    try:
        return large_image.open(str(path), encoding="JPEG", jpegQuality=JPEG_QUALITY, edge="crop")
    except TileSourceError as exc:
        raise SlideReadError("The file could not be read as a slide; it may be corrupt or not an image.") from exc


def open_uncached(path: str | Path) -> TileSource:
    """Open a source outside the cache, for one-off checks of files that may soon be deleted."""
    try:
        return large_image.open(str(path), noCache=True)
    except TileSourceError as exc:
        raise SlideReadError("The file could not be read as a slide; it may be corrupt or not an image.") from exc


def pyramid(source: TileSource) -> Pyramid:
    return Pyramid(
        width=int(source.sizeX),
        height=int(source.sizeY),
        tile_width=int(source.tileWidth),
        tile_height=int(source.tileHeight),
        levels=int(source.levels),
    )


def tile_jpeg(path: str | Path, z: int, x: int, y: int) -> bytes:
    """One JPEG tile. Raises TileNotFound outside the pyramid."""
    source = open_source(path)
    if not pyramid(source).has_tile(z, x, y):
        raise TileNotFound(f"There is no tile {z}/{x}/{y} in this slide.")
    try:
        data = source.getTile(x, y, z)
    except TileSourceXYZRangeError as exc:
        raise TileNotFound(f"There is no tile {z}/{x}/{y} in this slide.") from exc
    return _as_jpeg_bytes(data)


def thumbnail_jpeg(path: str | Path, max_size: int = THUMBNAIL_SIZE) -> bytes:
    """The whole slide as a JPEG no larger than ``max_size`` on its longest edge."""
    image = read_region(path, 0, 0, None, None, max_size=max_size)
    return encode_jpeg(image)


def low_res_rgb(path: str | Path, max_size: int) -> np.ndarray:
    """The whole slide as an RGB uint8 array no larger than ``max_size`` (for tissue detection)."""
    source = open_source(path)
    array, _ = source.getRegion(output={"maxWidth": max_size, "maxHeight": max_size}, format=TILE_FORMAT_NUMPY)
    return as_rgb(array)


def clamp_region(path: str | Path, left: int, top: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The part of a level-0 region inside the slide; TileNotFound if none of it is."""
    source = open_source(path)
    right, bottom = min(left + width, int(source.sizeX)), min(top + height, int(source.sizeY))
    left, top = max(left, 0), max(top, 0)
    if right <= left or bottom <= top:
        raise TileNotFound(f"The region lies outside the slide, which is {source.sizeX} x {source.sizeY} pixels.")
    return left, top, right - left, bottom - top


def read_region(
    path: str | Path,
    left: int,
    top: int,
    width: int | None,
    height: int | None,
    *,
    max_size: int | None = None,
    out_size: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB image of a level-0 region, scaled to ``out_size`` or to fit ``max_size``.

    Parts of the region outside the slide are white, so a patch at the edge of (or larger than)
    the slide keeps its geometry. ``width``/``height`` None means "to the slide's edge".
    """
    source = open_source(path)
    slide_w, slide_h = int(source.sizeX), int(source.sizeY)
    width = slide_w - left if width is None else width
    height = slide_h - top if height is None else height
    if width <= 0 or height <= 0:
        raise ValueError("Region width and height must be positive.")
    if out_size is None:
        scale = min(1.0, (max_size or max(width, height)) / max(width, height))
        out_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    out_w, out_h = out_size
    scale_x, scale_y = out_w / width, out_h / height
    canvas = Image.new("RGB", (out_w, out_h), "white")

    inner_left, inner_top = max(left, 0), max(top, 0)
    inner_right, inner_bottom = min(left + width, slide_w), min(top + height, slide_h)
    if inner_right <= inner_left or inner_bottom <= inner_top:
        return canvas
    paste_x, paste_y = round((inner_left - left) * scale_x), round((inner_top - top) * scale_y)
    paste_w = max(1, min(out_w - paste_x, round((inner_right - inner_left) * scale_x)))
    paste_h = max(1, min(out_h - paste_y, round((inner_bottom - inner_top) * scale_y)))
    region, _ = source.getRegion(
        region={
            "left": inner_left,
            "top": inner_top,
            "right": inner_right,
            "bottom": inner_bottom,
            "units": "base_pixels",
        },
        output={"maxWidth": paste_w, "maxHeight": paste_h},
        format=TILE_FORMAT_NUMPY,
    )
    piece = Image.fromarray(as_rgb(region))
    if piece.size != (paste_w, paste_h):
        piece = piece.resize((paste_w, paste_h), Image.Resampling.BILINEAR)
    canvas.paste(piece, (paste_x, paste_y))
    return canvas


def context_margin(context: float, patch_size: int) -> int:
    """Margin in output pixels: a fraction of the patch edge when < 1, else a pixel count.

    ValueError for a negative or non-finite context (``round`` would raise OverflowError on inf).
    """
    if not math.isfinite(context) or context < 0:
        raise ValueError("Context must be a finite number, not negative.")
    return round(context * patch_size) if context < 1 else round(context)


def read_patch(patch: Patch, context: float = 0) -> Image.Image:
    """A patch as an RGB image of the project's patch_size, with ``context`` margin on every side.

    ``context`` is a fraction of the patch edge (0.5 adds half a patch each side) when below 1,
    otherwise a margin in output pixels. The result is square: patch_size + 2 * margin.
    For batches, select_related("slide", "project") to avoid two queries per patch.
    """
    out = patch.project.patch_size
    margin = context_margin(context, out)
    margin_l0 = margin * patch.size / out
    left, top = round(patch.x - margin_l0), round(patch.y - margin_l0)
    extent = round(patch.size + 2 * margin_l0)
    return read_region(slide_path(patch.slide), left, top, extent, extent, out_size=(out + 2 * margin,) * 2)


def slide_path(slide: Any) -> str:
    if not slide.file:
        raise SlideReadError(f"Slide {slide.pk} has no file.")
    return str(slide.file.path)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _as_jpeg_bytes(data: Any) -> bytes:
    """getTile returns encoded bytes, or a PIL image/numpy array for synthesised tiles of some sources."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, np.ndarray):
        return encode_jpeg(Image.fromarray(as_rgb(data)))
    if isinstance(data, Image.Image):
        return encode_jpeg(data)
    return bytes(data)


def etag(checksum: str, *parts: object) -> str:
    """Strong ETag for an image derived from a slide: the file's sha256 plus what was asked for."""
    suffix = "-".join(str(part) for part in parts)
    return f'"{checksum[:32]}-v{ENCODING_VERSION}-{suffix}"'


def tilesource_info(path: str | Path) -> dict[str, Any]:
    """Geometry for an OpenSeadragon custom tile source (the caller adds the URL template)."""
    geometry = pyramid(open_source(path))
    return {
        "width": geometry.width,
        "height": geometry.height,
        "tileWidth": geometry.tile_width,
        "tileHeight": geometry.tile_height,
        "tileSize": geometry.tile_width,
        "tileOverlap": 0,
        "minLevel": 0,
        "maxLevel": geometry.levels - 1,
        "levels": geometry.levels,
    }


def region_jpeg(path: str | Path, left: int, top: int, width: int, height: int, max_size: int) -> bytes:
    """A level-0 region, clamped to the slide, scaled to fit ``max_size``; TileNotFound if wholly outside."""
    left, top, width, height = clamp_region(path, left, top, width, height)
    return encode_jpeg(read_region(path, left, top, width, height, max_size=max_size))


def patch_jpeg(patch: Patch, context: float = 0) -> bytes:
    return encode_jpeg(read_patch(patch, context))
