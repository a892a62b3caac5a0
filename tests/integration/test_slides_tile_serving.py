"""How tiles are made and served: stored JPEG passthrough, the shared Redis tile cache (keys carry
the file's checksum; seen by another process). The lean route in front of Django:
test_slides_lean_route.py; who may see tiles at all: test_authorisation_matrix.py."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from django.conf import settings
from PIL import Image

from annotations.slides import tiles
from tests.bench import make_wsi

from . import test_slides_support as support
from .test_slides_support import CMU, TCGA, ingest_file, jpeg, shared_slide

pytestmark = pytest.mark.django_db

_fresh_access_cache = support._fresh_access_cache
media = support.media
world, project, tcga, viewer = support.world, support.project, support.tcga, support.viewer

REPO_ROOT = Path(__file__).resolve().parents[2]


def raw_tile(path: Path, level: int, index: int) -> tuple[bytes, bytes | None, int]:
    """(stored tile bytes, JPEGTables, photometric) of one tile of a TIFF level, read by tifffile."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].pages[0]
        tif.filehandle.seek(page.dataoffsets[index])
        data = tif.filehandle.read(page.databytecounts[index])
        return data, page.jpegtables, int(page.photometric)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def large_image_pixels(path: Path, z: int, x: int, y: int) -> np.ndarray:
    tile = tiles.open_source(path).getTile(x, y, z, numpyAllowed="always")
    return np.asarray(tile)[..., :3].astype(np.int16)


# Passthrough.


def test_the_cmu1_regions_stored_jpeg_tiles_are_served_as_stored(media, project, viewer):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(CMU))
    path = Path(tiles.slide_path(slide))
    top = tiles.pyramid(tiles.open_source(path)).levels - 1  # 240 px tiles, 10 x 13 of them
    x, y = 4, 6
    raw, tables, photometric = raw_tile(path, 0, y * 10 + x)
    assert tables is not None and photometric == tifffile.PHOTOMETRIC.RGB  # Aperio: RGB JPEG, shared tables

    served = viewer.get(f"/api/v1/slides/{slide.pk}/tiles/{top}/{x}/{y}.jpeg")
    # The stored bytes verbatim, behind SOI + the "components are RGB" marker + the level's tables.
    assert served.content == b"\xff\xd8" + tiles.ADOBE_RGB + tables[2:-2] + raw[2:]
    # ... which a browser's decoder (libjpeg, like PIL's) reads as the colours large-image shows.
    assert np.abs(pixels(served.content) - large_image_pixels(path, top, x, y)).mean() < 2.0
    assert jpeg(served).size == (240, 240)


def test_edge_and_synthesised_tiles_are_rendered_not_passed_through(media, project, viewer):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(CMU))
    path = Path(tiles.slide_path(slide))
    top = tiles.pyramid(tiles.open_source(path)).levels - 1
    stored = tiles.stored_tiles(path, slide.checksum)
    assert stored is not None and set(stored.levels) == {top}  # the only level the file stores

    edge = viewer.get(f"/api/v1/slides/{slide.pk}/tiles/{top}/9/12.jpeg")  # 2220 = 9 * 240 + 60
    assert jpeg(edge).size == (60, 2967 - 12 * 240)
    assert edge.content[2:4] == b"\xff\xe0"  # large-image's JFIF encoding, not the stored tile
    lower = viewer.get(f"/api/v1/slides/{slide.pk}/tiles/{top - 1}/1/1.jpeg")
    assert jpeg(lower).size == (240, 240) and lower.content[2:4] == b"\xff\xe0"


def test_every_full_level_of_a_pyramidal_jpeg_tiff_passes_through(media, project, viewer, tmp_path):  # type: ignore[no-untyped-def]
    source = tmp_path / "pyramid.tiff"
    make_wsi.write(source, 3000, 2200, seed=3, islands=4, processes=1)
    slide = ingest_file(project, source)
    path = Path(tiles.slide_path(slide))
    geometry = tiles.pyramid(tiles.open_source(path))
    stored = tiles.stored_tiles(path, slide.checksum)
    assert stored is not None
    # Levels with at least one whole tile: 3000x2200 (11x8), 1500x1100 (5x4), 750x550 (2x2), 375x275 (1x1).
    assert sorted(stored.levels) == [geometry.levels - 4, geometry.levels - 3, geometry.levels - 2, geometry.levels - 1]
    for level, z in enumerate(range(geometry.levels - 1, geometry.levels - 5, -1)):
        columns = geometry.tile_counts(z)[0]
        raw, tables, _ = raw_tile(path, level, 0 * columns + 0)
        served = viewer.get(f"/api/v1/slides/{slide.pk}/tiles/{z}/0/0.jpeg").content
        assert served == b"\xff\xd8" + tables[2:-2] + raw[2:]
        assert np.abs(pixels(served) - large_image_pixels(path, z, 0, 0)).mean() < 2.0


def test_jpeg_2000_tiles_are_rendered(tcga, viewer):  # type: ignore[no-untyped-def]
    assert tiles.stored_tiles(tiles.slide_path(tcga), tcga.checksum) is None
    response = viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/5/3/3.jpeg")
    assert jpeg(response).size == (256, 256)


# The shared cache.


def cache_key(checksum: str, z: int, x: int, y: int) -> str:
    return f"{tiles.TILE_CACHE_PREFIX}:v{tiles.ENCODING_VERSION}:{checksum}:{z}/{x}/{y}"


def test_rendered_tiles_are_kept_in_redis_under_the_files_checksum(tcga, viewer):  # type: ignore[no-untyped-def]
    key = cache_key(tcga.checksum, 4, 2, 3)
    assert tiles.shared_cache.get(key) is None
    served = viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/4/2/3.jpeg").content
    assert tiles.shared_cache.get(key) == served
    assert tcga.checksum in key and tiles.slide_path(tcga) not in key


def test_a_replaced_file_never_gets_its_predecessors_tiles(media, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "slide.svs"
    shutil.copy(shared_slide(TCGA), path)
    first = tiles.tile_jpeg(path, 3, 1, 1, "a" * 64)
    # Same path, new content (a new upload under a reused name): a new checksum, so a cache miss.
    shutil.copy(shared_slide(CMU), path)
    tiles.clear_stored_tiles()
    import large_image

    large_image.cache_util.cachesClear()
    second = tiles.tile_jpeg(path, 3, 1, 1, "b" * 64)
    assert second != first
    assert tiles.shared_cache.get(cache_key("a" * 64, 3, 1, 1)) == first
    assert tiles.shared_cache.get(cache_key("b" * 64, 3, 1, 1)) == second


def test_the_cache_is_read_before_rendering(media, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    path = tmp_path / "slide.svs"
    shutil.copy(shared_slide(TCGA), path)
    tiles.shared_cache.set(cache_key("c" * 64, 2, 0, 0), b"from the cache")

    def no_render(*args: Any) -> bytes:
        raise AssertionError("rendered although the tile was cached")

    monkeypatch.setattr(tiles, "render_tile", no_render)
    assert tiles.tile_jpeg(path, 2, 0, 0, "c" * 64) == b"from the cache"


def test_another_process_sees_the_tiles_this_one_cached(tcga, viewer):  # type: ignore[no-untyped-def]
    served = viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/5/4/4.jpeg").content
    script = (
        "import django, sys; django.setup()\n"
        "from annotations.slides import tiles\n"
        "def no_render(*a): raise SystemExit('rendered: the shared cache was not used')\n"
        "tiles.render_tile = no_render\n"
        "sys.stdout.buffer.write(tiles.tile_jpeg(sys.argv[1], 5, 4, 4, sys.argv[2]))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "histoloop.settings", "TILE_CACHE_URL": settings.TILE_CACHE_URL}
    other = subprocess.run(
        [sys.executable, "-c", script, tiles.slide_path(tcga), tcga.checksum],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert other.returncode == 0, other.stderr.decode()[-2000:]
    assert other.stdout == served


def test_a_redis_outage_costs_only_speed(tcga, viewer, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(tiles, "shared_cache", tiles.SharedTileCache("redis://127.0.0.1:1/0"))
    assert jpeg(viewer.get(f"/api/v1/slides/{tcga.pk}/tiles/5/2/2.jpeg")).size == (256, 256)


def test_one_thread_builds_a_files_passthrough_index_while_the_others_wait(media, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import threading
    import time

    source = tmp_path / "pyramid.tiff"
    make_wsi.write(source, 1200, 900, seed=5, islands=2, processes=1)
    builds = []
    real = tiles._passthrough_levels

    def slow_build(path: str) -> dict:
        builds.append(path)
        time.sleep(0.2)  # long enough for every thread to arrive while it runs
        return real(path)

    monkeypatch.setattr(tiles, "_passthrough_levels", slow_build)
    found: list[object] = []
    threads = [threading.Thread(target=lambda: found.append(tiles.stored_tiles(source, "d" * 64))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(found) == 8 and found[0] is not None and all(entry is found[0] for entry in found)
