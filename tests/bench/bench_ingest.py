"""Ingest of a real-size slide through the real import path, against the small CMU-1 region in the same run.

    .venv/bin/python tests/bench/bench_ingest.py [--slide PATH] [--baseline PATH] [--pictures DIR]

Makes the 80,000 x 60,000 px fixture with ``make_wsi.py`` unless it exists (or ``--slide`` names
another file). Each slide is ingested in its own child process (so peak RSS is that slide's) in a
scratch database (``bench_scale.scratch_database``) with a throw-away MEDIA_ROOT, through
``ingest.add_slide_from_path`` (what
``manage.py import_slides`` calls: copy + sha256 into the slide store, header checks) and
``ingest.ingest`` (the Celery task's body: metadata, thumbnail, tissue mask, patch grid, queue).
Prints wall time per stage, peak RSS and patches, and the fixture's time per megapixel as a ratio
to the baseline's. Uses the servers of DATABASE_URL/REDIS_URL like manage.py; removes what it made.

``--pictures DIR`` writes the thumbnail, the low-resolution image, the tissue mask and the patch grid
over the thumbnail as PNGs, to look at.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench import make_wsi  # noqa: E402
from tests.bench.bench_scale import scratch_database  # noqa: E402

BASELINE = REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def load() -> str:
    return f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"


def timed(stages: dict[str, float], name: str, func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            stages[name] += time.perf_counter() - start

    return wrapper


def one(slide_file: Path, pictures: Path | None) -> dict[str, Any]:
    """Ingest one slide in this (child) process; the figures as a dict."""
    from histoloop import embedded

    embedded.ensure_environment()
    media = Path(tempfile.mkdtemp(prefix="histoloop-bench-ingest-"))
    os.environ["MEDIA_ROOT"] = str(media)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    import django

    django.setup()
    from annotations.domain import tissue
    from annotations.models import AnnotationTask, Project
    from annotations.slides import ingest, tiles
    from tests.factories import ProjectFactory

    stages: dict[str, float] = defaultdict(float)
    captured: dict[str, Any] = {}
    ingest.IncomingFile.from_path = classmethod(  # type: ignore[method-assign]
        timed(stages, "copy + sha256", ingest.IncomingFile.from_path.__func__)  # type: ignore[attr-defined]
    )
    ingest.inspect_file = timed(stages, "inspect (headers)", ingest.inspect_file)
    ingest._refuse_truncated_tiff = timed(stages, "truncation check", ingest._refuse_truncated_tiff)
    tiles.thumbnail_jpeg = timed(stages, "thumbnail", tiles.thumbnail_jpeg)

    def low_res(path: Any, max_size: int) -> Any:
        captured["rgb"] = rgb = original_low_res(path, max_size)
        return rgb

    original_low_res = tiles.low_res_rgb
    tiles.low_res_rgb = timed(stages, "low-res image", low_res)

    def mask(rgb: Any, *args: Any, **kwargs: Any) -> Any:
        captured["mask"] = result = original_mask(rgb, *args, **kwargs)
        return result

    original_mask = tissue.tissue_mask
    tissue.tissue_mask = timed(stages, "tissue mask", mask)
    tissue.patch_grid = timed(stages, "patch grid", tissue.patch_grid)
    ingest._write_grid = timed(stages, "write patches", ingest._write_grid)
    ingest._queue_patches = timed(stages, "queue patches", ingest._queue_patches)

    project = ProjectFactory(name=f"bench-ingest-{os.getpid()}-{int(time.time())}")
    try:
        start = time.perf_counter()
        slide = ingest.add_slide_from_path(project, slide_file, launch=False)
        added = time.perf_counter()
        slide = ingest.ingest(slide.pk)
        done = time.perf_counter()
        assert slide is not None and slide.status == "ready", slide and slide.error
        patches = slide.patches.count()
        tasks = AnnotationTask.objects.filter(patch__slide=slide).count()
        if pictures is not None:
            write_pictures(pictures, slide_file.stem, slide, captured)
        return {
            "slide": slide_file.name,
            "width": slide.width,
            "height": slide.height,
            "megapixels": slide.width * slide.height / 1e6,
            "file_mb": slide_file.stat().st_size / 2**20,
            "mpp": slide.mpp,
            "magnification": slide.magnification,
            "add_s": added - start,
            "ingest_s": done - added,
            "total_s": done - start,
            "patches": patches,
            "tasks": tasks,
            "extent": slide.patches.values_list("size", flat=True).first(),
            "stages": dict(stages),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load": load(),
        }
    finally:
        Project.objects.filter(pk=project.pk).delete()
        shutil.rmtree(media, ignore_errors=True)


def write_pictures(directory: Path, stem: str, slide: Any, captured: dict[str, Any]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    thumbnail = Image.open(slide.thumbnail.path).convert("RGB")
    thumbnail.save(directory / f"{stem}-thumbnail.png")
    Image.fromarray(captured["rgb"]).save(directory / f"{stem}-lowres.png")
    Image.fromarray((captured["mask"] * 255).astype(np.uint8)).save(directory / f"{stem}-mask.png")
    # On the low-resolution image (a patch is ~8 px there; on the 512 px thumbnail it would be ~1 px).
    grid = Image.fromarray(captured["rgb"]).convert("RGB")
    draw = ImageDraw.Draw(grid, "RGBA")
    scale = grid.width / slide.width
    for x, y, size in slide.patches.values_list("x", "y", "size"):
        draw.rectangle([x * scale, y * scale, (x + size) * scale - 1, (y + size) * scale - 1], outline=(0, 160, 0, 150))
    grid.save(directory / f"{stem}-grid.png")
    # The top-left island at full low-res scale, to look at the grid's fit.
    grid.crop((0, 0, min(grid.width, 900), min(grid.height, 700))).save(directory / f"{stem}-grid-corner.png")


def child(slide_file: Path, pictures: Path | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", str(slide_file)]
    if pictures is not None:
        command += ["--pictures", str(pictures)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"Ingest of {slide_file} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(row: dict[str, Any]) -> None:
    print(
        f"{row['slide']}: {row['width']} x {row['height']} px ({row['megapixels']:.0f} MP, {row['file_mb']:.0f} MiB, "
        f"{row['mpp']} um/px, {row['magnification']}x)"
    )
    print(
        f"  add (copy + sha256 + checks) {row['add_s']:.2f} s, ingest {row['ingest_s']:.2f} s, "
        f"total {row['total_s']:.2f} s; peak RSS {row['peak_rss_mb']:.0f} MB; {row['patches']} patches "
        f"({row['extent']} px), {row['tasks']} tasks; load {row['load']}"
    )
    for name, seconds in row["stages"].items():
        print(f"    {name:<20} {seconds:7.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="default: make_wsi.py's 80,000 x 60,000 fixture")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--pictures", type=Path, default=None)
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.pictures)))
        return 0
    slide_file = args.slide or make_wsi.default_path(80_000, 60_000)
    if not slide_file.exists():
        print(f"Making the fixture {slide_file} (load {load()})", flush=True)
        subprocess.run([sys.executable, str(Path(make_wsi.__file__)), "--out", str(slide_file)], check=True)
    from histoloop import embedded

    embedded.ensure_environment()
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("SECRET_KEY", "bench-ingest-" + "x" * 40)
    with scratch_database(keep=False) as url:
        os.environ["DATABASE_URL"] = url
        subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], check=True, cwd=REPO)
        print(f"{os.cpu_count()} CPUs; load {load()}; database {url.rsplit('/', 1)[-1]}\n")
        baseline = child(args.baseline, args.pictures)
        report(baseline)
        real = child(slide_file, args.pictures)
        report(real)
    per_mp = (real["total_s"] / real["megapixels"]) / (baseline["total_s"] / baseline["megapixels"])
    print(
        f"\nTime per megapixel, fixture / baseline: {per_mp:.3f}x; fixture total {real['total_s']:.1f} s "
        f"(goal <= 60 s), peak RSS {real['peak_rss_mb']:.0f} MB (goal <= 1024 MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
