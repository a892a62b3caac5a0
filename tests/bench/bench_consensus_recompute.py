"""Benchmark: a project's bulk consensus recompute at scale, the array path against the record path.

    .venv/bin/python tests/bench/bench_consensus.py --recompute [--votes 3000000] [--repeats 5] [--old-repeats 1]
        [--method dawid_skene] [--database NAME] [--keep]

A project of ``votes / 2.7`` patches, 90% of them voted on by three of 30 students (tests/bench/bench_scale.py's
``build_project``: set-based SQL, about 85% of votes right), and 0.5% of the voted patches gold with an
expert's vote, so Dawid-Skene is seeded as on a real project. Then, each run in a child process of its own (so
its peak RSS is its own):

- the first recompute (every row created) on the array path, and its steps;
- ``--repeats`` recomputes that change nothing, on the array path: median, p95, peak RSS;
- ``--old-repeats`` of the same on the record path, main's ``_recompute_project`` before the array path (kept
  below as the yardstick, with its ``_changed`` and ``_rewrite``): the ratio is measured in the same run;
- 1% new votes (a fourth student's vote on that many voted patches), then one recompute: the rows it creates
  and rewrites, how many of them had a new vote, and how many changed label or status.

Uses the PostgreSQL server of DATABASE_URL but a database of its own: ``wtcons_consensus_<pid>``, dropped at
the end unless ``--keep``; ``--database NAME`` uses (and keeps) that one, reusing a project already built there
for the same ``--votes``. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

VOTES_PER_VOTED_PATCH = 3 * 0.9  # build_project's three votes on 90% of the patches
GOLD_PER_MILLE = 5
MARKER_MS = 2001  # time_spent_ms of the 1% added votes (build_project's are 2000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the record path, as main had it (the yardstick) -------------------------------------------------------------


RECORD_PATH_SEEN: dict[str, Any] = {}  # what the last record-path run computed and found stored (for check_rows)


def record_path_recompute(project: Any) -> int:
    """main's ``consensus._recompute_project`` before the array path (0df2001), unchanged but for its imports
    (and for keeping its results and the rows it found in RECORD_PATH_SEEN)."""
    import json as json_module

    from django.db import connection, transaction

    from annotations import consensus as c
    from annotations.domain.consensus import batch_consensus
    from annotations.models import Consensus, LabelClass
    from tests.consensus_reference import record_path_changed as changed

    def rewrite(rows: list[Any]) -> None:
        if not rows:
            return
        columns = ("label_id", "confidence", "posterior", "method", "vote_count", "agreement", "status")
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS consensus_rewrite")
            cursor.execute(
                "CREATE TEMPORARY TABLE consensus_rewrite (id bigint PRIMARY KEY, label_id bigint, "
                "confidence double precision, posterior jsonb, method text, vote_count integer, "
                "agreement double precision, status text) ON COMMIT DROP"
            )
            with cursor.cursor.copy(f"COPY consensus_rewrite (id, {', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    values = [row.label_id, row.confidence, json_module.dumps(row.posterior), row.method]
                    copy.write_row([row.pk, *values, row.vote_count, row.agreement, row.status])
            assignments = ", ".join(f"{col} = n.{col}" for col in columns)
            cursor.execute(
                f"UPDATE {Consensus._meta.db_table} AS c SET {assignments}, updated_at = now() "
                "FROM consensus_rewrite AS n WHERE c.id = n.id"
            )
            cursor.execute("DROP TABLE consensus_rewrite")

    c.refresh_students(project, recompute=False)
    records = c.vote_records(project, weighted=True)
    results = (
        batch_consensus(
            records,
            c.label_names(project),
            **c.consensus_options(project),
            gold=c.gold_labels(project, records),
            seed=project.seed,
        )
        if records
        else {}
    )
    by_name = {lc.name: lc for lc in LabelClass.objects.filter(project=project)}
    existing = {
        row.patch_id: row
        for row in Consensus.objects.filter(project=project)
        .only("id", "patch_id", *c.CONSENSUS_UPDATE_FIELDS)
        .iterator(chunk_size=10_000)
    }
    create, update, contested, settled, unsettled = [], [], [], [], []
    pending = c._pending_fields(project)
    for pid, row in existing.items():
        if pid not in results and changed(row, pending):
            if row.status != Consensus.Status.PENDING:
                unsettled.append(pid)
            for field, value in pending.items():
                setattr(row, field, value)
            update.append(row)
    for item, result in results.items():
        row = existing.get(int(item))
        fields = c.consensus_fields(result, by_name.get(result.label or ""))
        if result.status != Consensus.Status.PENDING and (row is None or row.status == Consensus.Status.PENDING):
            settled.append(int(item))
        elif result.status == Consensus.Status.PENDING and row is not None and row.status != result.status:
            unsettled.append(int(item))
        if result.status == Consensus.Status.CONTESTED and (row is None or row.status != Consensus.Status.CONTESTED):
            contested.append(int(item))
        if row is None:
            create.append(Consensus(patch_id=int(item), project=project, **fields))
        elif changed(row, fields):
            for field, value in fields.items():
                setattr(row, field, value)
            update.append(row)
    RECORD_PATH_SEEN.update(results=results, existing=existing, create=len(create), update=len(update))
    with transaction.atomic():
        Consensus.objects.bulk_create(create, batch_size=1000)
        rewrite(update)
        if contested:
            c.send_contested_to_experts(project, contested)
        c.close_settled_crowd_tasks(project, settled)
        c.reopen_unsettled_crowd_tasks(project, unsettled)
    return len(results)


def check_rows(project: Any) -> dict[str, float]:
    """The record path's results against the rows the array path had stored before it: how many differ in label,
    status or vote count, and the largest difference of a probability (the rows as the record path read them:
    unchanged by it when it found nothing to rewrite, which it reports)."""
    results, stored = RECORD_PATH_SEEN["results"], RECORD_PATH_SEEN["existing"]
    from annotations.models import LabelClass

    ids = dict(LabelClass.objects.filter(project=project).values_list("name", "pk"))
    decided, largest = 0, 0.0
    for item, r in results.items():
        row = stored[int(item)]
        decided += (row.label_id != (ids[r.label] if r.label else None)) or (row.status, row.vote_count) != (
            r.status,
            r.vote_count,
        )
        largest = max(
            largest, abs(row.confidence - r.confidence), abs(row.agreement - r.agreement),
            max(abs(row.posterior[k] - v) for k, v in r.posterior.items()),
        )  # fmt: skip
    return {
        "record_path_rows_to_create": float(RECORD_PATH_SEEN["create"]),
        "record_path_rows_to_rewrite": float(RECORD_PATH_SEEN["update"]),
        "rows_differing_in_label_status_or_count": float(decided),
        "largest_probability_difference": largest,
    }


# --- the array path, step by step ----------------------------------------------------------------------------------


def array_path_steps(project: Any) -> dict[str, float]:
    """``consensus._recompute_project``'s steps, timed one by one (the same calls, in the same order)."""
    from django.db import transaction

    from annotations import consensus as c
    from annotations import consensus_batch as io
    from annotations.domain.consensus_arrays import batch_consensus_arrays, plan_changes
    from annotations.models import LabelClass

    steps: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = fn()
        steps[name] = time.perf_counter() - started
        return out

    step("refresh_students", lambda: c.refresh_students(project, recompute=False))
    labels = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", "name"))
    ids, names = [pk for pk, _ in labels], [name for _, name in labels]
    votes = step("read votes (COPY)", lambda: io.counted_vote_arrays(project, ids))
    gold = step("gold from the arrays", lambda: c._gold_arrays(project, votes, names))
    results = step(
        "batch_consensus_arrays",
        lambda: batch_consensus_arrays(votes, len(names), **c.consensus_options(project), **gold),
    )
    stored = step("read stored rows (COPY)", lambda: io.stored_rows(project, ids, names))
    changes = step("plan_changes", lambda: plan_changes(stored, results, c.PROBABILITY_TOLERANCE))

    def write() -> None:
        with transaction.atomic():
            io.insert_rows(project, results, changes.create, ids, names)
            io.rewrite_rows(
                changes.update_ids.tolist(), results, changes.update, ids, names, changes.to_pending.tolist(),
                project.consensus_method,
            )  # fmt: skip
            if len(changes.contested):
                c.send_contested_to_experts(project, changes.contested.tolist())
            c.close_settled_crowd_tasks(project, changes.settled.tolist())
            c.reopen_unsettled_crowd_tasks(project, changes.unsettled.tolist())

    step("write", write)
    steps["created"], steps["rewritten"] = float(len(changes.create)), float(len(changes.update))
    return steps


# --- runs in child processes ------------------------------------------------------------------------------------


def _child(kind: str, project_id: int, pipe: Any) -> None:
    import django

    django.setup()
    from annotations import consensus
    from annotations.models import Project

    project = Project.objects.get(pk=project_id)
    started_rss = rss_mb()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    extra: dict[str, float] = {}
    if kind == "array":
        consensus.recompute_project_consensus(project)
    elif kind == "array-steps":
        extra = array_path_steps(project)
    else:
        with consensus._project_lock(project):
            record_path_recompute(project)
    seconds = time.perf_counter() - started
    if kind == "record":
        extra = check_rows(project)  # after the clock: what the record path computed against what the array path stored
    pipe.send(
        {
            "seconds": seconds if kind == "record" else time.perf_counter() - started,
            "peak_rss_mb": rss_mb(),
            "rss_before_mb": started_rss,
            "load_before": load,
            "load_after": os.getloadavg()[0],
            **extra,
        }
    )


def in_child(kind: str, project_id: int) -> dict[str, float]:
    from django.db import connections

    connections.close_all()  # the child opens its own
    context = multiprocessing.get_context("fork")
    here, there = context.Pipe()
    process = context.Process(target=_child, args=(kind, project_id, there))
    process.start()
    figures = here.recv()
    process.join()
    return figures  # type: ignore[no-any-return]


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    seconds = [r["seconds"] for r in runs]
    checks = {k: max(r[k] for r in runs) for k in runs[0] if k.startswith(("record_path_", "rows_", "largest_"))}
    return {
        **checks,
        "n": len(runs),
        "median_s": statistics.median(seconds),
        "p95_s": percentile(seconds, 95),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "rss_before_mb": min(r["rss_before_mb"] for r in runs),
        "load_average": max(max(r["load_before"], r["load_after"]) for r in runs),
    }


# --- the project -----------------------------------------------------------------------------------------------


def project_for(votes: int, method: str) -> Any:
    """The project for ``votes`` votes: built (with gold and an expert) unless the database has it; its consensus
    rows, expert reviews and added votes removed, so every run starts from the same state."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from annotations.models import AnnotationTask, Consensus, Membership, Project, Vote
    from tests.bench.bench_scale import build_project

    tag = f"cons{votes}"
    project = Project.objects.filter(name=f"scale-{tag}").first()
    if project is None:
        project = build_project(round(votes / VOTES_PER_VOTED_PATCH), 100, tag, vote_share=0.9)
        expert = get_user_model().objects.create(username=f"{tag}-expert")
        Membership.objects.create(user=expert, project=project, role="expert")
        labels = list(project.label_classes.order_by("order").values_list("pk", flat=True))
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE annotations_patch p SET is_gold = true WHERE p.project_id = %(p)s "
                "AND abs(hashint8(p.id + 17)) %% 1000 < %(g)s "
                "AND EXISTS (SELECT 1 FROM annotations_vote v WHERE v.patch_id = p.id)",
                {"p": project.pk, "g": GOLD_PER_MILLE},
            )
            cursor.execute(
                "INSERT INTO annotations_vote (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, "
                "is_active, created_at) SELECT %(p)s, id, %(e)s, (%(labels)s::bigint[])[1 + id %% 3], 'expert', "
                "5000, true, now() FROM annotations_patch WHERE project_id = %(p)s AND is_gold",
                {"p": project.pk, "e": expert.pk, "labels": labels},
            )
            cursor.execute("ANALYZE annotations_patch, annotations_vote")
    Vote.objects.filter(project=project, time_spent_ms=MARKER_MS).delete()
    Consensus.objects.filter(project=project).delete()
    AnnotationTask.objects.filter(project=project, kind=AnnotationTask.Kind.EXPERT).delete()
    Project.objects.filter(pk=project.pk).update(consensus_method=method)
    project.refresh_from_db()
    return project


def add_votes(project: Any, share: float) -> int:
    """``share`` of the votes again as new ones: a fourth student's vote on that many voted patches (a student
    who has not voted on it: build_project's are (patch + r) mod 30 for r < 3), 85% right."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM annotations_vote WHERE project_id = %s", [project.pk])
        (n_votes,) = cursor.fetchone()
        students = list(
            project.memberships.filter(role="crowd").order_by("user__username").values_list("user_id", flat=True)
        )
        labels = list(project.label_classes.order_by("order").values_list("pk", flat=True))
        cursor.execute(
            "INSERT INTO annotations_vote (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, "
            "is_active, created_at) "
            "SELECT %(p)s, patch_id, (%(students)s::bigint[])[1 + (patch_id + 3) %% %(u)s], "
            "(%(labels)s::bigint[])[1 + CASE WHEN random() < 0.85 THEN patch_id %% 3 ELSE (patch_id + 1) %% 3 END], "
            "'crowd', %(marker)s, true, now() FROM ("
            "  SELECT DISTINCT patch_id FROM annotations_vote WHERE project_id = %(p)s AND role = 'crowd'"
            "  ORDER BY patch_id LIMIT %(n)s) AS chosen",
            {
                "p": project.pk,
                "students": students,
                "u": len(students),
                "labels": labels,
                "marker": MARKER_MS,
                "n": round(share * n_votes),
            },
        )
        return int(cursor.rowcount)


def snapshot(project: Any) -> dict[int, tuple[Any, str]]:
    from annotations.models import Consensus

    return {
        pid: (lbl, st)
        for pid, lbl, st in Consensus.objects.filter(project=project)
        .values_list("patch_id", "label_id", "status")
        .iterator(50_000)
    }


def after_new_votes(project: Any, share: float) -> dict[str, Any]:
    from django.db import connection

    before = snapshot(project)
    added = add_votes(project, share)
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        (started,) = cursor.fetchone()
    run = in_child("array", project.pk)
    after = snapshot(project)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(*) FILTER (WHERE EXISTS (SELECT 1 FROM annotations_vote v WHERE v.patch_id = "
            "c.patch_id AND v.time_spent_ms = %s)) FROM annotations_consensus c WHERE c.project_id = %s "
            "AND c.updated_at > %s",
            [MARKER_MS, project.pk, started],
        )
        written, with_new_vote = cursor.fetchone()
    created = len(set(after) - set(before))
    decided = sum(1 for pid, row in before.items() if after.get(pid) != row)
    return {
        "added_votes": added,
        "seconds": run["seconds"],
        "rows_written": int(written),
        "rows_created": created,
        "rows_rewritten": int(written) - created,
        "rewritten_with_a_new_vote": int(with_new_vote),
        "rewritten_without_a_new_vote": int(written) - created - int(with_new_vote),
        "label_or_status_changed": decided,
        "rows": len(after),
    }


# --- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=5, help="no-change recomputes on the array path")
    parser.add_argument("--old-repeats", type=int, default=1, help="no-change recomputes on the record path")
    parser.add_argument(
        "--method", default="dawid_skene", choices=["majority", "weighted", "expert_override", "dawid_skene"]
    )
    parser.add_argument("--new-votes", type=float, default=0.01, help="share of new votes for the rewrite count")
    parser.add_argument("--database", default="", help="use (and keep) this database, a project built there reused")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("SECRET_KEY", "bench-consensus-" + "x" * 40)
    from tests.bench.bench_scale import scratch_database

    if args.database:
        import psycopg

        server = os.environ["DATABASE_URL"]
        with psycopg.connect(server, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [args.database]).fetchone():
                conn.execute(f'CREATE DATABASE "{args.database}"')
        database: Any = nullcontext(urlunsplit(urlsplit(server)._replace(path="/" + args.database)))
    else:
        database = scratch_database(args.keep, prefix="wtcons_consensus")
    with database as url:
        os.environ["DATABASE_URL"] = url
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        project = project_for(args.votes, args.method)
        from annotations.models import Vote

        n_votes = Vote.objects.filter(project=project, is_active=True).count()
        print(
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; project {project.pk}: {n_votes:,} votes, "
            f"{project.patches.count():,} patches, method {args.method}",
            flush=True,
        )
        first = in_child("array-steps", project.pk)
        print(f"first recompute (array path, every row created): {first['seconds']:.2f} s, peak RSS "
              f"{first['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
        for name, seconds in first.items():
            if name not in ("seconds", "peak_rss_mb", "rss_before_mb", "load_before", "load_after"):
                print(f"    {name:<28} {seconds:10.2f}")
        steps = in_child("array-steps", project.pk)
        print("no-change recompute, steps (array path):")
        for name, seconds in steps.items():
            if name not in ("peak_rss_mb", "rss_before_mb", "load_before", "load_after"):
                print(f"    {name:<28} {seconds:10.2f}")
        new = summarise([in_child("array", project.pk) for _ in range(args.repeats)])
        print(f"no-change recompute, array path:  median {new['median_s']:.2f} s, p95 {new['p95_s']:.2f} s, peak RSS "
              f"{new['peak_rss_mb']:.0f} MB (from {new['rss_before_mb']:.0f}), load {new['load_average']:.2f}",
              flush=True)  # fmt: skip
        old = summarise([in_child("record", project.pk) for _ in range(args.old_repeats)]) if args.old_repeats else {}
        if old:
            print(f"no-change recompute, record path: median {old['median_s']:.2f} s, p95 {old['p95_s']:.2f} s, "
                  f"peak RSS {old['peak_rss_mb']:.0f} MB (from {old['rss_before_mb']:.0f}), load "
                  f"{old['load_average']:.2f}; ratio {old['median_s'] / new['median_s']:.1f}x", flush=True)  # fmt: skip
            print(f"  the record path against the array path's rows: {old['record_path_rows_to_create']:.0f} to "
                  f"create, {old['record_path_rows_to_rewrite']:.0f} to rewrite, "
                  f"{old['rows_differing_in_label_status_or_count']:.0f} differing in label, status or count; "
                  "largest probability difference "
                  f"{old['largest_probability_difference']:.2e}", flush=True)  # fmt: skip
        drift = after_new_votes(project, args.new_votes) if args.new_votes > 0 else {}
        if drift:
            d = drift
            print(f"after {d['added_votes']:,} new votes: {d['seconds']:.2f} s, {d['rows_written']:,} rows written "
                  f"({d['rows_created']:,} created, {d['rewritten_with_a_new_vote']:,} rewritten with a new vote, "
                  f"{d['rewritten_without_a_new_vote']:,} without; {d['label_or_status_changed']:,} changed label "
                  f"or status) of {d['rows']:,}", flush=True)  # fmt: skip
        result = {
            "votes": n_votes,
            "method": args.method,
            "first_recompute_s": first["seconds"],
            "first_recompute_peak_rss_mb": first["peak_rss_mb"],
            "no_change_steps_s": {k: v for k, v in steps.items() if k not in ("peak_rss_mb", "rss_before_mb")},
            "array_path": new,
            "record_path": old,
            "ratio_record_over_array": old["median_s"] / new["median_s"] if old else None,
            "after_new_votes": drift,
            "tolerance": 1e-3,
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
