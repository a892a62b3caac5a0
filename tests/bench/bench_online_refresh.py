"""Benchmark: the online reliability refresh (annotations.reliability.refresh) on a project's real tables.

    .venv/bin/python tests/bench/bench_online_refresh.py [--votes 3000000] [--students 300] [--keep]

A scratch database (``bench_online_<pid>``, as bench_scale.py makes one: created, migrated, dropped) holds one
project of ``--votes / 3`` patches, each with three different students' votes (accuracy 0.75, mistakes spread)
and an expert's vote on 5% of them, written with set-based SQL. Measured: the refresh cold (no stored fit),
then again after 1% more votes (warm-started from the stored fit), each split into reading the votes (the
binary COPY into arrays) and the whole refresh, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench.bench_scale import scratch_database  # noqa: E402

LABELS = [("adenocarcinoma", "#d62728"), ("benign", "#2ca02c"), ("squamous", "#1f77b4")]


def insert_votes(project: object, students: list[int], expert: int, labels: list[int], first: int, n: int) -> None:
    """Patches ``first`` .. ``first + n - 1`` of the project's slide (created here) with their votes."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO annotations_patch
                (project_id, slide_id, x, y, size, magnification, tissue_fraction, is_gold, created_at)
            SELECT %(p)s, (SELECT id FROM annotations_slide WHERE project_id = %(p)s LIMIT 1), (g %% 1000) * 224,
                   (g / 1000) * 224, 224, 20.0, 0.9, false, now()
            FROM generate_series(%(a)s, %(a)s + %(n)s - 1) AS g
            """,
            {"p": project.pk, "a": first, "n": n},  # type: ignore[attr-defined]
        )
        cursor.execute(
            "CREATE TEMP TABLE fresh AS SELECT id, id %% 3 AS truth FROM annotations_patch "
            "WHERE project_id = %(p)s ORDER BY id DESC LIMIT %(n)s",
            {"p": project.pk, "n": n},  # type: ignore[attr-defined]
        )
        cursor.execute(
            """
            INSERT INTO annotations_vote
                (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, created_at)
            SELECT %(p)s, f.id, (%(students)s::bigint[])[1 + (f.id * 7 + r * 101) %% %(u)s],
                   (%(labels)s::bigint[])[1 + CASE WHEN random() < 0.75 THEN f.truth
                                                   ELSE (f.truth + 1 + (random() * 2)::int %% 2) %% 3 END],
                   'crowd', 2000, true, now()
            FROM fresh f CROSS JOIN generate_series(0, 2) AS r
            """,
            {"p": project.pk, "students": students, "u": len(students), "labels": labels},  # type: ignore[attr-defined]
        )
        cursor.execute(
            """
            INSERT INTO annotations_vote
                (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, created_at)
            SELECT %(p)s, f.id, %(e)s, (%(labels)s::bigint[])[1 + f.truth], 'expert', 2000, true, now()
            FROM fresh f WHERE abs(hashint8(f.id)) %% 20 = 0
            """,
            {"p": project.pk, "e": expert, "labels": labels},  # type: ignore[attr-defined]
        )
        cursor.execute("DROP TABLE fresh")
        cursor.execute("ANALYZE annotations_vote")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=3_000_000)
    parser.add_argument("--students", type=int, default=300)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")
    os.environ.setdefault("SECRET_KEY", "bench-online-" + "x" * 40)
    with scratch_database(args.keep, prefix="bench_online") as url:
        os.environ["DATABASE_URL"] = url
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from annotations import reliability
        from annotations.models import LabelClass, Project, Slide

        call_command("migrate", verbosity=0)
        project = Project.objects.create(name="online", expert_routing="value")
        for order, (name, colour) in enumerate(LABELS):
            LabelClass.objects.create(project=project, name=name, colour=colour, hotkey=str(order + 1), order=order)
        Slide.objects.create(project=project, name="s.svs", status="ready", width=10**6, height=10**6)
        user = get_user_model()
        students = [u.pk for u in user.objects.bulk_create([user(username=f"s{i}") for i in range(args.students)])]
        expert = user.objects.create(username="expert").pk
        labels = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", flat=True))
        patches = args.votes // 3
        started = time.perf_counter()
        insert_votes(project, students, expert, labels, 0, patches)
        print(f"built {args.votes:,} crowd votes in {time.perf_counter() - started:.0f} s", flush=True)
        for phase, label in (("cold", "no stored fit"), ("warm", "+1% votes, warm start")):
            if phase == "warm":
                insert_votes(project, students, expert, labels, patches, patches // 100)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            rows = reliability.vote_arrays(project, labels)
            read = time.perf_counter() - started
            started = time.perf_counter()
            fit = reliability.refresh(project)
            total = time.perf_counter() - started
            assert fit is not None
            print(
                f"{phase} ({label}): read {len(rows):,} votes in {read:.1f} s; refresh {total:.1f} s "
                f"({fit.iterations} iterations, converged {fit.converged}); load {load:.1f}",
                flush=True,
            )
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
