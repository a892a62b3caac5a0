"""Training-set export at size: time and peak RSS of streaming 100,000 labelled patches as a zip.

    .venv/bin/python tests/bench/bench_export.py [--patches 100000] [--baseline 10000] [--patch-size 64]
        [--keep]

Uses the PostgreSQL server of DATABASE_URL (embedded when unset) but a database of its own,
``bench_export_<pid>``, created, migrated and dropped at the end. The real CMU-1 region
(``../shared/data/slides/cmu-1-small-region.svs``) is ingested once; then, with set-based SQL, enough
slide rows over that one file (one patient each) to hold ``--patches`` grid patches, each with a
consensus label, a posterior and an expert vote. Every exported patch is read from the slide and
encoded as PNG: nothing is synthetic but the rows.

Each export runs in a child process (``annotations.training_set.stream``, what the API endpoint and
``manage.py export_training_set`` send), which throws the bytes away as they come, keeping only
the tail to check the archive's end records (entry count, Zip64), and reports its own peak RSS.
Three children: one that only loads Django and the slide (the floor), one exporting ``--baseline``
patches, one exporting ``--patches``. Figures: wall time, patches/s, MB, peak RSS, and the ratios
of the large export to the baseline (RSS should stay flat: the goal is bounded memory). The load
average is printed with every figure. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench.bench_scale import scratch_database  # noqa: E402  (one scratch database helper)

SLIDE = REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
LABELS = [("tumour", "#d62728"), ("stroma", "#2ca02c"), ("necrosis", "#1f77b4")]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["DATABASE_POOL"] = "0"
    import django

    django.setup()


def build_project(n_patches: int, patch_size: int, tag: str) -> int:
    """A project with ``n_patches`` labelled grid patches over copies of the real slide; its id."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from annotations.models import LabelClass, Membership, Patch, Project, Slide
    from annotations.slides import ingest

    project = Project.objects.create(name=f"export-{tag}", patch_size=patch_size, votes_required=1)
    for order, (name, colour) in enumerate(LABELS):
        LabelClass.objects.create(project=project, name=name, colour=colour, hotkey=str(order + 1), order=order)
    first = ingest.add_slide_from_path(project, SLIDE, launch=False)
    ingest.ingest(first.pk)
    first.refresh_from_db()
    assert first.status == Slide.Status.READY, first.error
    edge = Patch.objects.filter(slide=first).values_list("size", flat=True).first() or patch_size
    cols, rows = first.width // edge, first.height // edge  # type: ignore[operator]
    per_slide = cols * rows
    n_slides = -(-n_patches // per_slide)
    expert = get_user_model().objects.create(username=f"{tag}-expert")
    Membership.objects.create(user=expert, project=project, role="expert")
    label_ids = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", flat=True))
    with transaction.atomic():
        Patch.objects.filter(slide=first).delete()
        fields = ("file", "format", "status", "width", "height", "levels", "mpp", "magnification", "size_bytes")
        values = {f: getattr(first, f) for f in fields}
        copies = Slide.objects.bulk_create(
            [
                Slide(
                    project=project,
                    name=f"copy-{i:04d}.svs",
                    group=f"patient-{i:04d}",
                    checksum=hashlib.sha256(f"{tag}-{i}".encode()).hexdigest(),
                    **values,
                )
                for i in range(1, n_slides)
            ]
        )
        slide_ids = [first.pk, *(s.pk for s in copies)]
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO annotations_patch
                    (project_id, slide_id, x, y, size, magnification, tissue_fraction, is_gold, created_at)
                SELECT %(p)s, (%(slides)s::bigint[])[1 + g / %(per)s], ((g %% %(per)s) %% %(cols)s) * %(edge)s,
                       ((g %% %(per)s) / %(cols)s) * %(edge)s, %(edge)s, %(mag)s, 0.9, false, now()
                FROM generate_series(0, %(n)s - 1) AS g
                """,
                {
                    "p": project.pk, "slides": slide_ids, "per": per_slide, "cols": cols, "edge": edge,
                    "n": n_patches, "mag": float(project.magnification),
                },
            )  # fmt: skip
            cursor.execute(
                """
                INSERT INTO annotations_vote
                    (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, provenance,
                     created_at)
                SELECT %(p)s, id, %(u)s, (%(labels)s::bigint[])[1 + id %% 3], 'expert', 1000, true, 'manual', now()
                FROM annotations_patch WHERE project_id = %(p)s
                """,
                {"p": project.pk, "u": expert.pk, "labels": label_ids},
            )
            cursor.execute(
                """
                INSERT INTO annotations_consensus
                    (patch_id, project_id, label_id, confidence, posterior, method, vote_count, agreement,
                     status, updated_at)
                SELECT v.patch_id, %(p)s, v.label_id, 0.9,
                       jsonb_build_object('tumour', 0.05, 'stroma', 0.05, 'necrosis', 0.05) ||
                       jsonb_build_object(l.name, 0.9), 'dawid_skene', 1, 1.0, 'expert', now()
                FROM annotations_vote v JOIN annotations_labelclass l ON l.id = v.label_id
                WHERE v.project_id = %(p)s
                """,
                {"p": project.pk},
            )
    return int(project.pk)


def child(project_id: int | None) -> None:
    """Export one project, bytes discarded; print one JSON line with the figures."""
    from annotations import training_set
    from annotations.models import Project
    from annotations.slides import tiles

    tiles.open_source(SLIDE)  # the floor child pays for the slide's open too
    if project_id is None:
        print(json.dumps({"patches": 0, "seconds": 0.0, "bytes": 0, "entries": 0, "peak_rss_mb": peak_rss_mb()}))
        return
    project = Project.objects.get(pk=project_id)
    started = time.perf_counter()
    size, tail, chunks = 0, b"", 0
    for chunk in training_set.stream(project):
        size += len(chunk)
        chunks += 1
        tail = (tail + chunk)[-(1 << 16) :]
    seconds = time.perf_counter() - started
    at = tail.rfind(b"PK\x06\x06")  # the Zip64 end of central directory record
    entries = struct.unpack("<Q", tail[at + 32 : at + 40])[0] if at >= 0 else struct.unpack("<H", tail[-12:-10])[0]
    print(
        json.dumps(
            {
                "patches": training_set.count(project),
                "seconds": seconds,
                "bytes": size,
                "chunks": chunks,
                "entries": entries,
                "zip64": at >= 0,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def run_child(url: str, project_id: int | None) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": url}
    argv = [sys.executable, __file__, "--child", str(project_id or 0)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--patch-size", type=int, default=64, help="the project's patch size in px (32-2048)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("SECRET_KEY", "bench-export-" + "x" * 40)
    if args.child is not None:
        setup_django(os.environ["DATABASE_URL"])
        child(args.child or None)
        return 0
    if not SLIDE.is_file():
        raise SystemExit(f"{SLIDE} is missing (see ../shared/data/README.md)")

    import tempfile

    media = tempfile.mkdtemp(prefix="bench_export_media_")
    os.environ["MEDIA_ROOT"] = media
    try:
        with scratch_database(args.keep, prefix="bench_export") as url:
            setup_django(url)
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
            print(f"{os.cpu_count()} cores, {load()}, database {url.rsplit('/', 1)[-1]}", flush=True)
            ids = {}
            for n in (args.baseline, args.patches):
                started = time.perf_counter()
                ids[n] = build_project(n, args.patch_size, f"p{n}")
                print(f"built {n:,} labelled patches in {time.perf_counter() - started:.1f}s ({load()})", flush=True)
            from django.db import connections

            connections.close_all()
            floor = run_child(url, None)
            print(f"floor (Django + slide open, no export): peak RSS {floor['peak_rss_mb']:.0f} MB ({load()})")
            results = {}
            for n in (args.baseline, args.patches):
                row = run_child(url, ids[n])
                assert row["entries"] == n + 1, row  # every patch and the manifest
                row["patches_per_s"] = n / row["seconds"]
                results[n] = row
                print(
                    f"{n:>8,} patches: {row['seconds']:.1f}s ({row['patches_per_s']:.0f} patches/s), "
                    f"{row['bytes'] / 1e6:.0f} MB in {row['chunks']} chunks, zip64 {row['zip64']}, "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB ({load()})",
                    flush=True,
                )
    finally:
        import shutil

        shutil.rmtree(media, ignore_errors=True)
    big, base = results[args.patches], results[args.baseline]
    rss_ratio = big["peak_rss_mb"] / base["peak_rss_mb"]
    growth = (big["peak_rss_mb"] - floor["peak_rss_mb"]) / max(1.0, base["peak_rss_mb"] - floor["peak_rss_mb"])
    speed_ratio = big["patches_per_s"] / base["patches_per_s"]
    print(
        f"{args.patches:,} vs {args.baseline:,}: peak RSS {rss_ratio:.2f}x (above the floor {growth:.2f}x for "
        f"{args.patches / args.baseline:.0f}x the patches), throughput {speed_ratio:.2f}x"
    )
    summary = {
        "patches": args.patches,
        "patch_size": args.patch_size,
        "seconds": round(big["seconds"], 1),
        "patches_per_s": round(big["patches_per_s"], 1),
        "megabytes": round(big["bytes"] / 1e6, 1),
        "peak_rss_mb": round(big["peak_rss_mb"], 1),
        "baseline_patches": args.baseline,
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "floor_peak_rss_mb": round(floor["peak_rss_mb"], 1),
        "rss_ratio": round(rss_ratio, 3),
        "rss_growth_above_floor_ratio": round(growth, 3),
        "throughput_ratio": round(speed_ratio, 3),
        "loadavg": os.getloadavg()[0],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
