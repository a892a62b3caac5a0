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

How a tile is made (:func:`tile_jpeg`), cheapest first:

1. **Stored JPEG, passed through.** Where a TIFF level is exactly the z level the viewer asks for
   (same tile size, ``width // 2**k``), its tiles are baseline JPEG and the browser's decoder
   reads them as large-image does (checked once per level on a sample tile), an interior tile is
   the stored bytes with the level's JPEGTables put in front: one ``pread``, no decode, no encode.
   large-image cannot do this itself here: it re-encodes whenever ICC correction is on (its
   default) and reads SVS files through OpenSlide. Edge tiles (cropped) and colour-corrected
   slides go the next way.
2. **Shared cache.** Tiles large-image renders (JPEG 2000 levels, synthesised levels, edges) are
   kept in Redis (``TILE_CACHE_URL``; unset, the platform's ``REDIS_URL``, the embedded one too) under
   ``histoloop:tile:v<ENCODING_VERSION>:<sha256 of the file>:<z>/<x>/<y>``, for
   ``TILE_CACHE_SECONDS``, so every server process and host shares them and a replaced file (new
   checksum) can never be answered with its predecessor's tiles.
3. **Rendered** by large-image's ``getTile``, then stored in the shared cache.

large-image's own ``cache_backend='redis'`` is deliberately not switched on: it caches every
``getTile`` call, the numpy tiles behind every ``getRegion`` (ingest, patch reads for embedding)
included, for 100 days, keyed by file path and not content, in the Redis that is also the Celery
broker. A million-patch embedding pass would fill it. Its in-process cache stays as it is.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import large_image
import numpy as np
from django.conf import settings
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
# Bump when tile encoding changes, so browsers holding "immutable" tiles fetch the new ones
# (and the shared cache's keys change with it). 2: stored JPEG tiles passed through.
ENCODING_VERSION = "2"
TILE_CACHE_SECONDS = 7 * 24 * 3600
TILE_CACHE_PREFIX = "histoloop:tile"
STORED_SOURCES = 64  # slide files whose TIFF tile index is kept open per process
# An Adobe APP14 marker with transform 0: "these components are R, G, B", for JPEG tiles a TIFF
# declares RGB (Aperio's). Without it a browser's decoder, like libjpeg, takes three components for
# YCbCr and shows false colours; libtiff is told by the TIFF tag instead.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

large_image.config.setConfig("max_small_image_size", MAX_SMALL_IMAGE_SIZE)
logger = logging.getLogger(__name__)


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


def tile_jpeg(path: str | Path, z: int, x: int, y: int, checksum: str = "") -> bytes:
    """One JPEG tile: the stored one where it can be passed through, else from the shared cache
    (when ``checksum``, the file's sha256, is given) or rendered. Raises TileNotFound outside the pyramid."""
    stored = stored_tiles(path, checksum)
    if stored is not None:
        data = stored.tile(z, x, y)
        if data is not None:
            return data
    key = cache_key(checksum, z, x, y) if checksum else ""
    if key:
        cached = shared_cache.get(key)
        if cached is not None:
            return cached
    data = render_tile(path, z, x, y)
    if key:
        shared_cache.set(key, data)
    return data


def cache_key(checksum: str, z: int, x: int, y: int) -> str:
    """A tile's key in the shared cache: the file's content and the encoding, never its path."""
    return f"{TILE_CACHE_PREFIX}:v{ENCODING_VERSION}:{checksum}:{z}/{x}/{y}"


def stored_tile(path: str | Path, checksum: str, z: int, x: int, y: int) -> bytes | None:
    """The stored JPEG of a tile if the file's passthrough index is already built in this process
    (no file is opened here, so the event loop may call it), else None."""
    with _stored_lock:
        found = _stored.get((str(path), checksum))
    return found.tile(z, x, y) if found is not None else None


def render_tile(path: str | Path, z: int, x: int, y: int) -> bytes:
    """A tile from large-image's getTile (decoded and re-encoded as JPEG where needed)."""
    source = open_source(path)
    if not pyramid(source).has_tile(z, x, y):
        raise TileNotFound(f"There is no tile {z}/{x}/{y} in this slide.")
    try:
        data = source.getTile(x, y, z)
    except TileSourceXYZRangeError as exc:
        raise TileNotFound(f"There is no tile {z}/{x}/{y} in this slide.") from exc
    return _as_jpeg_bytes(data)


class SharedTileCache:
    """Finished tile bytes in the platform's Redis; a Redis outage only costs speed (logged once a minute)."""

    def __init__(self, url: str, seconds: int = TILE_CACHE_SECONDS) -> None:
        self.url = url
        self.seconds = seconds
        self._client: Any = None
        self._async: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._quiet_until = 0.0

    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import redis

                    self._client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client().get(key)
        except Exception as exc:  # redis.RedisError, or an unusable URL
            self._complain(exc)
            return None
        return bytes(value) if value is not None else None

    async def aget(self, key: str) -> bytes | None:
        """:meth:`get` on the running event loop, without a hop to a thread (the lean tile route)."""
        try:
            value = await self._async_client().get(key)
        except Exception as exc:
            self._complain(exc)
            return None
        return bytes(value) if value is not None else None

    def _async_client(self) -> Any:
        # redis.asyncio clients belong to the loop they were made on: one per loop (a server
        # process has one; tests make a loop per request).
        import asyncio

        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            import redis.asyncio

            self._async = (loop, redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2))
        return self._async[1]

    def set(self, key: str, value: bytes) -> None:
        try:
            self.client().set(key, value, ex=self.seconds)
        except Exception as exc:
            self._complain(exc)

    def clear(self) -> int:
        """Delete every cached tile (all slides, all versions); the number deleted."""
        client = self.client()
        keys = list(client.scan_iter(match=f"{TILE_CACHE_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)

    def _complain(self, exc: Exception) -> None:
        import time

        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 60
            # Not the URL: it may carry a password.
            logger.warning("The shared tile cache (Redis) is unavailable (%r); rendering tiles without it.", exc)


shared_cache = SharedTileCache(settings.TILE_CACHE_URL)


@dataclass(frozen=True)
class StoredLevel:
    """Where one z level's tiles lie in the file, and the JPEG tables to put in front of them."""

    offsets: np.ndarray  # int64, one per tile, row-major
    counts: np.ndarray
    columns: int
    rows: int
    head: bytes  # SOI + the level's tables (or just SOI when each tile carries its own)
    full_columns: int  # tiles wholly inside the level (the rest are cropped, so rendered)
    full_rows: int


class StoredTiles:
    """The JPEG levels of one slide file that can be served as stored (see the module docstring)."""

    def __init__(self, path: str, levels: dict[int, StoredLevel]) -> None:
        self.path = path
        self.levels = levels
        self._fd = os.open(path, os.O_RDONLY) if levels else -1

    def tile(self, z: int, x: int, y: int) -> bytes | None:
        level = self.levels.get(z)
        if level is None or not (0 <= x < level.full_columns and 0 <= y < level.full_rows):
            return None
        index = y * level.columns + x
        count = int(level.counts[index])
        if not count:  # a sparse tile: large-image fills it in
            return None
        frame = os.pread(self._fd, count, int(level.offsets[index]))
        if len(frame) != count or frame[:2] != b"\xff\xd8":
            return None  # truncated or not a JPEG frame: let the reader give the verdict
        return level.head + frame[2:]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_stored: OrderedDict[tuple[str, str], StoredTiles] = OrderedDict()
_stored_lock = threading.Lock()
_building: dict[tuple[str, str], threading.Lock] = {}


def stored_tiles(path: str | Path, checksum: str = "") -> StoredTiles | None:
    """The passthrough index of a slide file, built once per process (None if nothing can pass through).

    One thread builds it (~0.2 s for an 80,000 px slide); the others asking meanwhile wait for it
    rather than each parsing the file again (a viewer's first view asks for a dozen tiles at once).
    """
    key = (str(path), checksum)
    with _stored_lock:
        found = _stored.get(key)
        if found is not None:
            _stored.move_to_end(key)
            return found if found.levels else None
        building = _building.setdefault(key, threading.Lock())
    with building:
        with _stored_lock:
            found = _stored.get(key)  # built by the thread we waited for
        if found is None:
            try:
                found = StoredTiles(str(path), _passthrough_levels(str(path)))
            except Exception:  # not a TIFF, or one tifffile cannot parse: everything is rendered
                logger.debug("No stored JPEG tiles in %s", path, exc_info=True)
                found = StoredTiles(str(path), {})
            with _stored_lock:
                _stored[key] = found
                _building.pop(key, None)
                while len(_stored) > STORED_SOURCES:
                    _, old = _stored.popitem(last=False)
                    old.close()
    return found if found.levels else None


def clear_stored_tiles() -> None:
    with _stored_lock:
        for entry in _stored.values():
            entry.close()
        _stored.clear()


def _passthrough_levels(path: str) -> dict[int, StoredLevel]:
    import tifffile

    source = open_source(path)
    geometry = pyramid(source)
    if getattr(source, "_iccprofiles", None) and large_image.config.getConfig("icc_correction", True):
        return {}  # large-image corrects the colours of the tiles it renders; stored ones would differ
    levels: dict[int, StoredLevel] = {}
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            return {}
        for level_pages in tif.series[0].levels:
            page = level_pages.pages[0] if level_pages.pages else None
            if page is None or not isinstance(page, tifffile.TiffPage):
                continue
            z = _z_of(page, geometry)
            if z is None or z in levels:
                continue
            candidate = _stored_level(page, geometry, z)
            if candidate is not None and _decodes_like_large_image(path, source, candidate, z, page):
                levels[z] = candidate
    return levels


def _z_of(page: Any, geometry: Pyramid) -> int | None:
    """The z level a TIFF page is exactly, or None."""
    if page.imagewidth <= 0:
        return None
    for k in range(geometry.levels):
        z = geometry.levels - 1 - k
        if (page.imagewidth, page.imagelength) == geometry.level_size(z):
            return z
    return None


def _stored_level(page: Any, geometry: Pyramid, z: int) -> StoredLevel | None:
    import tifffile

    if (
        page.compression != tifffile.COMPRESSION.JPEG
        or not page.is_tiled
        or (page.tilewidth, page.tilelength) != (geometry.tile_width, geometry.tile_height)
        or page.bitspersample != 8
        or page.samplesperpixel != 3
        or page.planarconfig != tifffile.PLANARCONFIG.CONTIG
        or page.photometric not in (tifffile.PHOTOMETRIC.YCBCR, tifffile.PHOTOMETRIC.RGB)
        or _tag(page, "Orientation", 1) != 1  # rotated or mirrored storage: large-image turns the tiles
    ):
        return None
    columns, rows = geometry.tile_counts(z)
    if len(page.dataoffsets) != columns * rows:
        return None
    width, height = geometry.level_size(z)
    tables = page.jpegtables
    head = b"\xff\xd8" + (ADOBE_RGB if page.photometric == tifffile.PHOTOMETRIC.RGB else b"")
    head += bytes(tables)[2:-2] if tables else b""
    return StoredLevel(
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        counts=np.asarray(page.databytecounts, dtype=np.int64),
        columns=columns,
        rows=rows,
        head=head,
        full_columns=width // geometry.tile_width,
        full_rows=height // geometry.tile_height,
    )


def _tag(page: Any, name: str, default: Any) -> Any:
    tag = page.tags.get(name)
    return default if tag is None else tag.value


def _decodes_like_large_image(path: str, source: Any, level: StoredLevel, z: int, page: Any) -> bool:
    """A sample tile of the level, passed through and decoded as a browser would (libjpeg), matches
    large-image's pixels: the geometry is the same and the colour space is read the same way."""
    if not level.full_columns or not level.full_rows:
        return False
    x, y = level.full_columns // 2, level.full_rows // 2
    probe = StoredTiles(path, {z: level})
    try:
        data = probe.tile(z, x, y)
    finally:
        probe.close()
    if data is None:
        return False
    try:
        ours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    except Exception:
        return False
    theirs = as_rgb(np.asarray(source.getTile(x, y, z, numpyAllowed="always")))
    theirs = theirs[: ours.shape[0], : ours.shape[1]].astype(np.int16)
    return ours.shape == theirs.shape and float(np.abs(ours - theirs).mean()) < 2.0


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
