"""Students who improve at size: the lease's gold coin, a student's learning curve and the gold-count refresh.

    .venv/bin/python tests/bench/bench_students.py [--sizes 100000,1000000] [--repeat 5] [--keep]

Each size is a number of votes, built as bench_provenance builds them (three crowd votes per patch from 30
students, an expert vote on a tenth of the patches, a consensus row per patch) in a scratch database of its own,
with 1% of the patches (expert-labelled ones) marked gold and a certification threshold of 0.8.

Measured, median of ``--repeat`` runs, against a baseline from the same run: the fixed-rate coin's query (one
student's vote count, what every crowd lease sent before). Figures: the adaptive coin (``students.wants_gold``:
the vote count and the membership's gold counts, one query), one student's learning curve (blocks of 25) computed
(``learning_curve_ms``: what every request did before the cache), served from the cache and missing it (the first
request after a change it depends on), the refresh of one student's gold counts (after each gold answer) and of
every member (a threshold change), and the students' table. The machine's load average is printed beside each
figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.bench_provenance import median_ms, run_sizes  # noqa: E402


def measure(project, repeat: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from django.db import connection

    from annotations import students
    from annotations.models import Membership, Patch, Project, Vote

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE annotations_patch SET is_gold = true WHERE project_id = %s AND id %% 100 = 0", [project.pk]
        )
        cursor.execute("ANALYZE annotations_patch")
    Project.objects.filter(pk=project.pk).update(adaptive_gold=True, gold_rate=0.1, certification_threshold=0.8)
    project.refresh_from_db()
    member = Membership.objects.filter(project=project, role="crowd").select_related("user").first()
    assert member is not None
    user = member.user
    students.refresh_students(project, recompute=False)
    n_votes = Vote.objects.filter(project=project, annotator=user).count()
    n_gold = Patch.objects.filter(project=project, is_gold=True).count()
    print(f"  one student: {n_votes:,} votes; {n_gold:,} gold patches", flush=True)

    mine = Vote.objects.filter(project=project, annotator=user)
    figures = {"baseline_fixed_coin_ms": median_ms(mine.count, repeat)}
    figures["adaptive_coin_ms"] = median_ms(lambda: students.wants_gold(project, user, 0), repeat)
    # The curve as computed before it was cached (every request), a request that finds it cached, and one that
    # does not (the key's two reads, the computation and the store: the first request after a change).
    figures["learning_curve_ms"] = median_ms(lambda: students.compute_learning_curve(project, user.pk, 25), repeat)
    students.learning_curve(project, user.pk, 25)
    figures["learning_curve_cached_ms"] = median_ms(lambda: students.learning_curve(project, user.pk, 25), repeat)

    def after_a_change() -> None:
        students.reference_changed(project.pk)  # outside a transaction: at once
        students.learning_curve(project, user.pk, 25)

    figures["learning_curve_miss_ms"] = median_ms(after_a_change, repeat)
    print(
        f"  learning curve: {figures['learning_curve_ms'] / figures['learning_curve_cached_ms']:.0f}x faster cached"
        f" ({figures['learning_curve_ms']:.1f} -> {figures['learning_curve_cached_ms']:.2f} ms), a miss"
        f" {figures['learning_curve_miss_ms'] / figures['learning_curve_ms']:.2f}x the uncached curve",
        flush=True,
    )
    figures["refresh_one_student_ms"] = median_ms(
        lambda: students.refresh_students(project, user, recompute=False), repeat
    )
    figures["refresh_every_member_ms"] = median_ms(lambda: students.refresh_students(project, recompute=False), repeat)
    figures["students_table_ms"] = median_ms(lambda: students.students(project), repeat)
    return figures


def main() -> int:
    return run_sizes(__doc__, "bench_students", "s", measure, baseline="baseline_fixed_coin_ms", repeat=5)


if __name__ == "__main__":
    raise SystemExit(main())
