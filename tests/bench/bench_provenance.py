"""The provenance figures at size: labelling speed, agreement by provenance and a round's label modes.

    .venv/bin/python tests/bench/bench_provenance.py [--sizes 100000,1000000] [--repeat 3] [--keep]

Each size is a number of votes (three per patch, 30 students and an expert on a tenth of the patches, a
mix of modes: 60% one at a time, 20% accepted suggestions, 10% bulk, 10% "more like this", each
student's votes about 9 s apart), written with set-based SQL into a scratch database of its own
(``bench_provenance_<pid>``, dropped at the end), with a final consensus row per patch.

Measured, uncached, median of ``--repeat`` runs: ``speed.labelling_speed`` (the window query over every
vote), ``agreement.provenance_agreement`` (three aggregate joins) and ``speed.trained_label_modes`` (what a
round records at its snapshot), each against a baseline measured in the same run: one
``SELECT count(*)`` over the project's votes (a scan of what every figure must read once). The machine's
load average is printed beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench.bench_scale import scratch_database  # noqa: E402

LABELS = [("adenocarcinoma", "#d62728"), ("benign", "#2ca02c"), ("squamous", "#1f77b4")]
N_STUDENTS = 30


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def build(n_votes: int, tag: str) -> Any:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from annotations.models import LabelClass, Membership, Project, Slide

    n_patches = max(1, n_votes // 3)
    started = time.perf_counter()
    with transaction.atomic():
        project = Project.objects.create(name=f"provenance-{tag}", consensus_method="majority")
        for order, (name, colour) in enumerate(LABELS):
            LabelClass.objects.create(project=project, name=name, colour=colour, hotkey=str(order + 1), order=order)
        slide = Slide.objects.create(project=project, name=f"{tag}.svs", status="ready", checksum=tag.ljust(64, "0"))
        User = get_user_model()
        people = User.objects.bulk_create([User(username=f"{tag}-student-{i}") for i in range(N_STUDENTS)])
        expert = User.objects.create(username=f"{tag}-expert")
        Membership.objects.bulk_create([Membership(user=u, project=project, role="crowd") for u in people])
        Membership.objects.create(user=expert, project=project, role="expert")
        labels = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", flat=True))
        params = {
            "p": project.pk,
            "s": slide.pk,
            "n": n_patches,
            "students": [u.pk for u in people],
            "u": N_STUDENTS,
            "labels": labels,
            "expert": expert.pk,
        }
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO annotations_patch
                    (project_id, slide_id, x, y, size, magnification, tissue_fraction, is_gold, created_at)
                SELECT %(p)s, %(s)s, (g %% 1000) * 224, (g / 1000) * 224, 224, 20.0, 0.9, false, now()
                FROM generate_series(0, %(n)s - 1) AS g
                """,
                params,
            )
            # Three students per patch, one vote every 0.3 s across the project: each student's votes are
            # about 9 s apart. The mode is a hash of the vote, so every run builds the same mix.
            cursor.execute(
                """
                INSERT INTO annotations_vote
                    (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, provenance,
                     created_at)
                SELECT %(p)s, p.id, (%(students)s::bigint[])[1 + (p.id + r) %% %(u)s],
                       (%(labels)s::bigint[])[1 + CASE WHEN random() < 0.85 THEN p.id %% 3 ELSE (p.id + 1) %% 3 END],
                       'crowd', 3000, true,
                       CASE WHEN m < 60 THEN 'manual' WHEN m < 80 THEN 'accepted-suggestion'
                            WHEN m < 90 THEN 'bulk' ELSE 'similar' END,
                       now() - interval '30 days' + (p.id * 3 + r) * interval '300 milliseconds'
                FROM annotations_patch p CROSS JOIN generate_series(0, 2) AS r
                CROSS JOIN LATERAL (SELECT abs(hashint8(p.id * 3 + r)) %% 100 AS m) AS mode
                WHERE p.project_id = %(p)s
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotations_vote
                    (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, provenance,
                     created_at)
                SELECT %(p)s, id, %(expert)s, (%(labels)s::bigint[])[1 + id %% 3], 'expert', 5000, true, 'manual',
                       now() - interval '30 days' + id * interval '10 seconds'
                FROM annotations_patch WHERE project_id = %(p)s AND id %% 10 = 0
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotations_consensus
                    (patch_id, project_id, label_id, confidence, posterior, method, vote_count, agreement, status,
                     updated_at)
                SELECT id, %(p)s, (%(labels)s::bigint[])[1 + id %% 3], 0.9, '{}', 'majority', 3, 0.9,
                       CASE WHEN id %% 10 = 0 THEN 'expert' ELSE 'agreed' END, now()
                FROM annotations_patch WHERE project_id = %(p)s
                """,
                params,
            )
            cursor.execute("SELECT count(*) FROM annotations_vote WHERE project_id = %s", [project.pk])
            built = cursor.fetchone()[0]
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE annotations_patch, annotations_vote, annotations_consensus")
    print(f"built {tag}: {built:,} votes on {n_patches:,} patches in {time.perf_counter() - started:.1f} s ({load()})")
    return project


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(project: Any, repeat: int) -> dict[str, float]:
    from datetime import UTC, datetime

    from django.db import connection

    from annotations import agreement, speed

    def baseline() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM annotations_vote WHERE project_id = %s", [project.pk])
            cursor.fetchone()

    since = datetime(2000, 1, 1, tzinfo=UTC)
    figures = {"baseline_count_ms": median_ms(baseline, repeat)}
    figures["labelling_speed_ms"] = median_ms(lambda: speed.labelling_speed(project, since), repeat)
    figures["provenance_agreement_ms"] = median_ms(lambda: agreement.provenance_agreement(project), repeat)
    figures["trained_label_modes_ms"] = median_ms(lambda: speed.trained_label_modes(project), repeat)
    return figures


def run_sizes(
    doc: str,
    name: str,
    tag: str,
    measure: Callable[[Any, int], dict[str, float]],
    *,
    baseline: str,
    versus: str = "the baseline",
    repeat: int = 3,
) -> int:
    """A benchmark's command line over projects of ``--sizes`` votes (:func:`build`, project names starting with
    ``tag``), each in a scratch database of its own (``<name>_<pid>``): ``measure(project, repeat)`` returns
    figures in ms, printed with their ratio to the ``baseline`` figure ("Nx ``versus``") and the load average,
    then how each grew from the smallest size to the largest, then all of them as one JSON line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="votes per project, comma-separated")
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("SECRET_KEY", name.replace("_", "-") + "-" + "x" * 40)
    with scratch_database(args.keep, prefix=name) as url:
        os.environ["DATABASE_URL"] = url
        os.environ["DATABASE_POOL"] = "0"
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        print(f"{os.cpu_count()} cores, {load()}", flush=True)
        results: dict[int, dict[str, float]] = {}
        for n in sizes:
            project = build(n, f"{tag}{n}")
            figures = measure(project, args.repeat)
            base = figures[baseline]
            for figure, ms in figures.items():
                ratio = "" if figure == baseline else f"  {ms / base:7.1f}x {versus}"
                print(f"{n:>10,} votes  {figure:<26} {ms:9.2f} ms{ratio}  ({load()})", flush=True)
            results[n] = figures
        if len(sizes) > 1:
            small, big = sizes[0], sizes[-1]
            growth = {k: results[big][k] / results[small][k] for k in results[big]}
            print(f"growth {small:,} -> {big:,} votes ({big / small:.0f}x): " + json.dumps(growth))
        print(json.dumps({"sizes": results, "load": os.getloadavg()}))
    return 0


def main() -> int:
    return run_sizes(__doc__, "bench_provenance", "v", measure, baseline="baseline_count_ms", versus="the count")


if __name__ == "__main__":
    raise SystemExit(main())
