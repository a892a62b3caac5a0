"""The pages people open, in a project of a million patches: the viewer's overlays for one slide of
50,000 patches, and the admin's and the students' pages.

    .venv/bin/python tests/bench/bench_pages.py [--patches 1000000] [--slides 20] [--requests 20] [--keep]

A scratch database on the server of DATABASE_URL (embedded when unset), created, migrated and dropped
at the end, as ``bench_scale.py`` does, with the same rows: ``--patches`` patches spread evenly over
``--slides`` slides (the defaults give 50,000 a slide, the top of a real slide at 20x), one open crowd
task each, three crowd votes on 1% of them. Then the platform's own batch consensus
(``recompute_project_consensus``) turns those votes into consensus rows (it also routes what is
contested to experts), and a model version stores a probability for every patch through
``learner.scores.write`` (what a round's publish writes), with random probabilities.

Measured through the whole Django stack in-process (``django.test.Client``, session login, every
middleware; ``--requests`` GETs each, after one warm-up), median and p95 and body bytes:
- ``overlay/?slide=`` (the label overlay) as an admin and as a crowd member (who sees labels only
  on the patches they voted on), ``heatmap/?slide=`` (the prediction heatmap) as an expert;
- the admin's task list (``tasks/``): the first page, a page from the middle (``before=``), and the
  rare filter ``kind=expert`` (the contested patches), whose keyset walk could scan the whole queue;
- ``stats/`` (the dashboard), ``agreement/``, ``students/`` and one student's learning curve as an admin;
  the agreement report is computed first as the worker computes it for a project this size
  (``agreement.store_report``, timed: three runs after one warm-up), so the page serves it cached.
Baselines in the same run: the project's detail page (``GET projects/<id>/``: the stack's own cost,
one row); for the overlay, one ``values_list`` read of the slide's patch rows (the floor any form of
the overlay has to read) and the same patches as one JSON object each, rendered by DRF's
``JSONRenderer`` (the form the scale issue warns against). Also printed: the ``EXPLAIN (ANALYZE,
BUFFERS)`` of the overlay's query and of the task list's rare filter at this size.

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench.bench_scale import build_project, scratch_database, show  # noqa: E402


def timed(fn: Any, n: int) -> tuple[list[float], Any]:
    fn()  # warm-up: the first request also plans the queries and fills the member cache
    times, last = [], None
    for _ in range(n):
        started = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - started)
    return times, last


def store_scores(project: Any) -> Any:
    """A model version with a (random) probability of every class for every patch, stored as a round does."""
    import numpy as np
    from django.db import connection

    from learner import scores
    from learner.models import ModelVersion, TrainingRound

    names = [lc.name for lc in project.label_classes.order_by("order")]
    round_ = TrainingRound.objects.create(project=project, number=1, state="succeeded")
    version = ModelVersion.objects.create(
        project=project, round=round_, backbone="bench", train_mode="head", weights_path="", class_names=names
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, slide_id FROM annotations_patch WHERE project_id = %s", [project.pk])
        rows = np.array(cursor.fetchall(), dtype=np.int64)
    proba = np.random.default_rng(0).dirichlet(np.ones(len(names)), size=len(rows)).astype(np.float32)
    started = time.perf_counter()
    n = scores.write(version, rows[:, 0], rows[:, 1], proba)
    print(f"stored scores of {len(rows):,} patches in {n} slide rows in {time.perf_counter() - started:.1f} s")
    return version


def run(args: argparse.Namespace) -> int:
    with scratch_database(args.keep, prefix="bench_pages") as url:
        os.environ["DATABASE_URL"] = url
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client
        from rest_framework.renderers import JSONRenderer

        from annotations import agreement, api_reports
        from annotations.consensus import recompute_project_consensus
        from annotations.models import AnnotationTask, Consensus, Membership, Patch, Vote

        call_command("migrate", verbosity=0)
        logging.getLogger("axes").setLevel(logging.WARNING)  # a line per login otherwise
        print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, database {url.rsplit('/', 1)[-1]}")
        project = build_project(args.patches, args.slides, "overlay")
        started = time.perf_counter()
        n_consensus = recompute_project_consensus(project)
        print(f"batch consensus: {n_consensus:,} rows in {time.perf_counter() - started:.1f} s")
        store_scores(project)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE annotations_consensus, annotations_vote")
        slide_id = project.slides.order_by("pk").values_list("pk", flat=True).first()
        n_patches = Patch.objects.filter(slide_id=slide_id).count()
        n_labelled = Consensus.objects.filter(patch__slide_id=slide_id, label__isnull=False).count()
        crowd = (
            Vote.objects.filter(project=project, patch__slide_id=slide_id).values_list("annotator", flat=True).first()
        )
        User = get_user_model()
        admin = User.objects.create_user("overlay-admin")
        expert = User.objects.create_user("overlay-expert")
        Membership.objects.create(user=admin, project=project, role="admin")
        Membership.objects.create(user=expert, project=project, role="expert")
        clients = {}
        for name, user in (("admin", admin), ("expert", expert), ("crowd", User.objects.get(pk=crowd))):
            clients[name] = Client()
            clients[name].force_login(user)
        print(f"slide {slide_id}: {n_patches:,} patches, {n_labelled:,} with a consensus label")

        def get(who: str, path: str) -> bytes:
            response = clients[who].get(f"/api/v1/projects/{project.pk}/{path}")
            assert response.status_code == 200, (path, response.status_code, response.content[:200])
            return response.content

        middle = AnnotationTask.objects.filter(project=project).order_by("pk").values_list("pk", flat=True)
        middle_id = middle[AnnotationTask.objects.filter(project=project).count() // 2]
        n_expert = AnnotationTask.objects.filter(project=project, kind="expert").count()
        print(f"{n_expert:,} expert tasks (the contested patches) among the project's tasks")
        figures: dict[str, Any] = {
            "patches": args.patches,
            "slide_patches": n_patches,
            "labelled_on_slide": n_labelled,
            "expert_tasks": n_expert,
        }
        # What the worker runs for a project this large (annotations.agreement.refresh_report); the page then
        # serves that report from the cache.
        times, _ = timed(lambda: agreement.store_report(project), 3)
        figures["agreement_compute_on_worker"] = show("agreement report, computed (the worker's part)", times)
        print(f"-- {args.requests} requests each, through Django in-process")
        pages = (
            ("project_detail", "admin", ""),
            ("overlay_admin", "admin", f"overlay/?slide={slide_id}"),
            ("overlay_crowd", "crowd", f"overlay/?slide={slide_id}"),
            ("heatmap", "expert", f"heatmap/?slide={slide_id}"),
            ("tasks_first_page", "admin", "tasks/"),
            ("tasks_middle_page", "admin", f"tasks/?before={middle_id}"),
            ("tasks_expert_only", "admin", "tasks/?kind=expert"),
            ("stats_admin", "admin", "stats/"),
            ("agreement", "admin", "agreement/"),
            ("students", "admin", "students/"),
            ("learning_curve", "admin", f"students/{crowd}/learning-curve/"),
        )
        for key, who, path in pages:
            times, body = timed(lambda who=who, path=path: get(who, path), args.requests)
            row = show(f"{path or 'project detail'} as {who}", times)
            count = json.loads(body).get("count") if path.startswith(("overlay", "heatmap")) else None
            per = f" ({len(body) / count:.1f} a patch, {count:,} patches)" if count else ""
            print(f"    {len(body):,} bytes{per}")
            figures[key] = {**row, "bytes": len(body)}
        base = figures["project_detail"]["median_ms"]
        print(
            "median over the project detail page's: "
            + ", ".join(f"{k} {figures[k]['median_ms'] / base:.1f}x" for k, _, _ in pages[1:])
        )

        def floor() -> list[Any]:
            rows = Patch.objects.filter(project=project, slide_id=slide_id).order_by("pk")
            return list(rows.values_list("pk", "x", "y", "size", "is_gold"))

        times, _ = timed(floor, args.requests)
        figures["floor_read"] = show("floor: read the slide's patch rows", times)

        def objects() -> bytes:
            shown = dict(
                Consensus.objects.filter(project=project, patch__slide_id=slide_id, label__isnull=False).values_list(
                    "patch_id", "label__name"
                )
            )
            return JSONRenderer().render(
                [
                    {"id": pk, "x": x, "y": y, "size": size, "label": shown.get(pk), "is_gold": gold}
                    for pk, x, y, size, gold in floor()
                ]
            )

        times, body = timed(objects, args.requests)
        figures["objects_json"] = {**show("baseline: one JSON object a patch", times), "bytes": len(body)}
        print(f"    {len(body):,} bytes ({len(body) / n_patches:.1f} a patch)")
        admin_median = figures["overlay_admin"]["median_ms"]
        print(
            f"overlay as admin: {admin_median / figures['floor_read']['median_ms']:.2f}x the floor read, "
            f"{admin_median / figures['objects_json']['median_ms']:.2f}x the JSON-objects form's time, "
            f"{figures['overlay_admin']['bytes'] / figures['objects_json']['bytes']:.2f}x its bytes "
            f"(goal: well under a second for {n_patches:,} patches)"
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + api_reports._OVERLAY_SQL,
                {"project": project.pk, "slide": slide_id, "crowd": False, "user": admin.pk},
            )
            print("the overlay's query, as an admin:\n  " + "\n  ".join(r[0] for r in cursor.fetchall()))
            query, params = (
                AnnotationTask.objects.filter(project=project, kind="expert")
                .order_by("-id")[:100]
                .query.sql_with_params()
            )
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params)
            print("task list, kind=expert:\n  " + "\n  ".join(r[0] for r in cursor.fetchall()))
        figures["load_average"] = list(os.getloadavg())
        print(json.dumps(figures))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=1_000_000)
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")
    os.environ.setdefault("HTTPS", "0")
    os.environ.setdefault("SECRET_KEY", "bench-pages-" + "x" * 40)
    scratch = Path(tempfile.mkdtemp(prefix="bench_pages_"))
    os.environ.setdefault("LEARNER_CACHE_DIR", str(scratch / "cache"))
    os.environ.setdefault("LEARNER_WEIGHTS_DIR", str(scratch / "models"))
    try:
        return run(args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
