"""The queue and a round at real size: a million patches over a hundred slides.

    .venv/bin/python tests/bench/bench_scale.py [--patches 1000000] [--slides 100] [--sizes 10000,100000]
        [--annotators 20] [--annotator-processes 2] [--pace 2.0] [--pairs 300] [--vote-share 0.01] [--no-round]
        [--no-routing] [--keep] [--profile FILE]

Uses the PostgreSQL server of DATABASE_URL (embedded when unset) but a database of its own,
``bench_scale_<pid>``, created, migrated and dropped at the end (``--keep`` leaves it), so nothing
touches your data and a million rows are removed in one ``DROP DATABASE``.

Rows are real rows of the platform's tables, written with set-based SQL (``INSERT ... SELECT
generate_series``) for speed: slides, patches, one open crowd task per patch, crowd votes on 1% of
the patches (``--vote-share``; three students each) and those tasks done. No pixels are read.

Measured, in-process (the platform's own functions, one database connection per thread):
- for each size in ``--sizes`` and ``--patches``: lease + vote by one crowd member (median, p95,
  max over ``--pairs``) and ``queue.queue_stats`` (the dashboard's counts, uncached) and
  ``stats.queue_counts`` (what the dashboard reads: cached); at ``--patches``, the lease statement's
  ``EXPLAIN (ANALYZE, BUFFERS)`` (its generic prepared plan, rolled back: the partial index at work);
- unless ``--no-round``: one head-mode round (``pipeline.run_round``, the Celery task's body) on
  the largest project with synthetic cached embeddings, while ``--annotators`` threads lease and
  vote the whole time, spread over ``--annotator-processes`` spawned processes (0: threads in the
  round's own process, where they compete with it for the GIL): every stage's time, the round's
  peak RSS, rows written per table, and the annotators' lease latency and empty answers before,
  during and after the round.
- unless ``--no-routing``, on the largest project afterwards: the crowd policy's per-project passes, gold
  on a fifth of the voted patches and a certification threshold about half the students fall below, then
  every member's gold counts refreshed and the consensus of the patches of the students who changed side
  recomputed; the crowd's Dawid-Skene fit and routing by value of a round-sized batch (``split_batch``).

The last line is one JSON object with the figures the scale issue asks for.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402

VOTE_SHARE = 0.01
VOTES_PER_PATCH = 3
N_STUDENTS = 30
LABELS = [("adenocarcinoma", "#d62728"), ("benign", "#2ca02c"), ("squamous", "#1f77b4")]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds: median, p95, max."""
    if not values:
        return {"n": 0, "median_ms": float("nan"), "p95_ms": float("nan"), "max_ms": float("nan")}
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 95) * 1000,
        "max_ms": max(values) * 1000,
    }


def show(name: str, values: list[float]) -> dict[str, float]:
    row = summary(values)
    print(
        f"  {name:<40} n={row['n']:<5} median {row['median_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms"
        f"  max {row['max_ms']:8.2f} ms",
        flush=True,
    )
    return row


# --- a database of its own ----------------------------------------------------------------------------


@contextmanager
def scratch_database(keep: bool, prefix: str = "bench_scale") -> Iterator[str]:
    """CREATE DATABASE on the server of DATABASE_URL; yields its URL; DROP DATABASE afterwards."""
    import psycopg

    server = os.environ["DATABASE_URL"]
    name = f"{prefix}_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server)._replace(path="/" + name))
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            from django.db import connections

            connections.close_all()
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- building a project ---------------------------------------------------------------------------------


def build_project(n_patches: int, n_slides: int, tag: str, vote_share: float = VOTE_SHARE) -> Any:
    """A project of ``n_patches`` patches over ``n_slides`` slides, queued, ``vote_share`` of them (1% unless
    given) voted on by three students each."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from annotations.models import LabelClass, Membership, Project, Slide

    started = time.perf_counter()
    with transaction.atomic():
        project = Project.objects.create(name=f"scale-{tag}", votes_required=VOTES_PER_PATCH, gold_rate=0.0)
        for order, (name, colour) in enumerate(LABELS):
            LabelClass.objects.create(project=project, name=name, colour=colour, hotkey=str(order + 1), order=order)
        slides = Slide.objects.bulk_create(
            [
                Slide(
                    project=project,
                    name=f"slide-{i:04d}.svs",
                    status=Slide.Status.READY,
                    width=150_000,
                    height=100_000,
                    levels=10,
                    mpp=0.5,
                    magnification=20.0,
                    checksum=f"{tag}-{i:04d}".ljust(64, "0"),
                    group=f"case-{i // 2}",
                )
                for i in range(n_slides)
            ]
        )
        User = get_user_model()
        students = User.objects.bulk_create([User(username=f"{tag}-student-{i}") for i in range(N_STUDENTS)])
        Membership.objects.bulk_create([Membership(user=u, project=project, role="crowd") for u in students])
        slide_ids = [s.pk for s in slides]
        student_ids = [u.pk for u in students]
        label_ids = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", flat=True))
        with connection.cursor() as cursor:
            # Each slide gets a grid of 224 px patches, 400 to a row: (slide, x, y) is unique.
            cursor.execute(
                """
                INSERT INTO annotations_patch
                    (project_id, slide_id, x, y, size, magnification, tissue_fraction, is_gold, created_at)
                SELECT %(p)s, (%(slides)s::bigint[])[1 + g %% %(s)s], ((g / %(s)s) %% 400) * 224,
                       ((g / %(s)s) / 400) * 224, 224, 20.0, 0.9, false, now()
                FROM generate_series(0, %(n)s - 1) AS g
                """,
                {"p": project.pk, "slides": slide_ids, "s": n_slides, "n": n_patches},
            )
            # One open crowd task per patch, in a random order (what ingest's seeded spread gives).
            cursor.execute(
                """
                INSERT INTO annotations_annotationtask
                    (project_id, patch_id, kind, priority, arm, state, votes_needed, votes_received,
                     created_at, updated_at)
                SELECT %(p)s, id, 'crowd', random(), '', 'open', %(k)s, 0, now(), now()
                FROM annotations_patch WHERE project_id = %(p)s
                """,
                {"p": project.pk, "k": VOTES_PER_PATCH},
            )
            # vote_share of the patches: three students' votes each, mostly agreeing; their tasks are done.
            cursor.execute(
                """
                CREATE TEMP TABLE voted ON COMMIT DROP AS
                SELECT id AS patch_id, (id %% 3) AS truth FROM annotations_patch
                WHERE project_id = %(p)s AND (abs(hashint8(id)) %% 100000) < %(share)s * 100000
                """,
                {"p": project.pk, "share": vote_share},
            )
            cursor.execute(
                """
                INSERT INTO annotations_vote
                    (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, created_at)
                SELECT %(p)s, v.patch_id, (%(students)s::bigint[])[1 + (v.patch_id + r) %% %(u)s],
                       (%(labels)s::bigint[])[1 + CASE WHEN random() < 0.85 THEN v.truth
                                                       ELSE (v.truth + 1) %% 3 END],
                       'crowd', 2000, true, now()
                FROM voted v CROSS JOIN generate_series(0, %(k)s - 1) AS r
                """,
                {"p": project.pk, "students": student_ids, "u": N_STUDENTS, "labels": label_ids, "k": VOTES_PER_PATCH},
            )
            cursor.execute(
                """
                UPDATE annotations_annotationtask t SET state = 'done', votes_received = %(k)s
                FROM voted v WHERE t.patch_id = v.patch_id AND t.project_id = %(p)s
                """,
                {"p": project.pk, "k": VOTES_PER_PATCH},
            )
            cursor.execute("SELECT count(*) FROM annotations_vote WHERE project_id = %s", [project.pk])
            n_votes = cursor.fetchone()[0]
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE annotations_patch, annotations_annotationtask, annotations_vote")
    print(
        f"built {tag}: {n_patches:,} patches on {n_slides} slides, {n_votes:,} crowd votes "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    project.students = students  # type: ignore[attr-defined]
    return project


# --- measurements ---------------------------------------------------------------------------------------


def lease_and_vote(project: Any, user: Any) -> tuple[float, bool]:
    """One annotator step in-process: lease, then vote. (seconds, whether a task came back)."""
    from annotations import queue, voting

    started = time.perf_counter()
    task = queue.lease_next_task(project, user, "crowd")
    if task is None:
        return time.perf_counter() - started, False
    voting.cast_vote(project, user, "crowd", patch_id=task.patch_id, label="benign", task_id=task.pk)
    return time.perf_counter() - started, True


def queue_figures(project: Any, pairs: int, *, plan: bool = False) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from annotations import queue, stats
    from annotations.models import Membership

    user = get_user_model().objects.create(username=f"scale-probe-{project.pk}")
    Membership.objects.create(user=user, project=project, role="crowd")
    lease_and_vote(project, user)  # warm
    times = [lease_and_vote(project, user)[0] for _ in range(pairs)]
    raw, cached = [], []
    for _ in range(20):
        started = time.perf_counter()
        queue.queue_stats(project)
        raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        stats.queue_counts(project)
        cached.append(time.perf_counter() - started)
    if plan:
        from tests.bench.bench_queue import lease_plan

        print("  the lease statement, EXPLAIN (ANALYZE, BUFFERS) of its generic prepared plan:")
        print("\n".join(f"    {line}" for line in lease_plan(project, user).splitlines()))
    return {
        "lease_vote": show("lease + vote, one crowd member", times),
        "queue_stats": show("queue_stats (uncached)", raw),
        "queue_counts": show("stats.queue_counts (dashboard, cached)", cached),
    }


PHASES = ("before", "during", "after")


class Annotators:
    """``n`` threads leasing and voting as students, recording each lease's latency and empty answers.

    ``phase`` (a callable) says which phase a lease belongs to; by default the ``phase`` attribute, which
    the caller sets. The threads share the caller's process (and its GIL): the smoke test's round runs in
    a Celery worker process, so that is fine there; the benchmark runs them in processes of their own
    (``AnnotatorProcesses``) so the round's Python work does not show up as lease latency."""

    def __init__(
        self,
        project: Any,
        n: int,
        students: list[Any] | None = None,
        phase: Callable[[], str] | None = None,
        pace: float = 0.02,
    ) -> None:
        self.project = project
        self.pace = pace  # seconds from one lease to the next (at least), per annotator
        self.students = (project.students if students is None else students)[:n]
        self.phase = "before"
        self._phase_of = phase or (lambda: self.phase)
        self.lease: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        self.empty: dict[str, int] = {"before": 0, "during": 0, "after": 0}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(u,), daemon=True) for u in self.students]

    def _work(self, user: Any) -> None:
        from django.db import connection

        from annotations import queue, voting

        try:
            # Annotators start out of step, so a slow pace does not send every lease at the same instant.
            self._stop.wait(random.Random(user.pk).uniform(0, self.pace))
            while not self._stop.is_set():
                phase = self._phase_of()
                started = time.perf_counter()
                task = queue.lease_next_task(self.project, user, "crowd")
                self.lease[phase].append(time.perf_counter() - started)
                if task is None:
                    self.empty[phase] += 1
                    self._stop.wait(0.05)
                    continue
                voting.cast_vote(self.project, user, "crowd", patch_id=task.patch_id, label="benign", task_id=task.pk)
                self._stop.wait(max(0.0, self.pace - (time.perf_counter() - started)))
        except Exception as exc:  # pragma: no cover - reported
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def _annotator_process(
    project_id: int, student_ids: list[int], pace: float, phase: Any, ready: Any, stop: Any, results: Any
) -> None:
    """A spawned process's body: Django set up against the same database (the parent's environment), its
    share of the annotator threads, their figures sent back on ``results`` once ``stop`` is set."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from annotations.models import Project

    project = Project.objects.get(pk=project_id)
    by_id = get_user_model().objects.in_bulk(student_ids)
    students = [by_id[i] for i in student_ids]
    crowd = Annotators(project, len(student_ids), students, lambda: PHASES[phase.value], pace=pace)
    crowd.start()
    ready.set()
    stop.wait()
    crowd.stop()
    results.put({"lease": crowd.lease, "empty": crowd.empty, "errors": crowd.errors})


class AnnotatorProcesses:
    """``n`` annotator threads spread over ``processes`` spawned processes (Django set up in each, against
    the same database), with the same ``phase``, ``lease``, ``empty`` and ``errors`` as ``Annotators``:
    latencies are gathered when they stop. Out of the round's process, a lease's latency is the
    database's and the machine's, not the round's hold on the GIL."""

    def __init__(self, project: Any, n: int, processes: int, pace: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        ids = [u.pk for u in project.students[:n]]
        processes = max(1, min(processes, len(ids)))
        self._phase = ctx.Value("i", 0)
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._ready = [ctx.Event() for _ in range(processes)]
        self._procs = [
            ctx.Process(
                target=_annotator_process,
                args=(project.pk, ids[i::processes], pace, self._phase, self._ready[i], self._stop, self._results),
                daemon=True,
            )
            for i in range(processes)
        ]
        self.lease: dict[str, list[float]] = {p: [] for p in PHASES}
        self.empty: dict[str, int] = dict.fromkeys(PHASES, 0)
        self.errors: list[str] = []

    @property
    def phase(self) -> str:
        return PHASES[self._phase.value]

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase.value = PHASES.index(value)

    def start(self) -> None:
        from django.db import connections

        connections.close_all()  # nothing of this process's connection state to hand over
        for proc in self._procs:
            proc.start()
        for ready in self._ready:
            if not ready.wait(120):
                raise RuntimeError("an annotator process did not start within 120 s")

    def stop(self) -> None:
        self._stop.set()
        for _ in self._procs:
            got = self._results.get(timeout=120)
            for p in PHASES:
                self.lease[p].extend(got["lease"][p])
                self.empty[p] += got["empty"][p]
            self.errors.extend(got["errors"])
        for proc in self._procs:
            proc.join(30)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table_counts() -> dict[str, int]:
    """Rows per table (tasks per kind): their growth over a round is what the round inserted, except
    consensus rows, which the annotators' votes create meanwhile."""
    from django.db import connection

    tables = [
        "annotations_consensus",
        "learner_modelversion",
        "learner_slidescores",
        "learner_traininground",
    ]
    counts = {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT kind, count(*) FROM annotations_annotationtask GROUP BY kind")
        counts.update({f"annotations_annotationtask[{kind}]": n for kind, n in cursor.fetchall()})
        for table in tables:
            cursor.execute("SELECT to_regclass(%s)", [table])
            if cursor.fetchone()[0] is None:
                continue
            cursor.execute(f"SELECT count(*) FROM {table}")
            counts[table] = cursor.fetchone()[0]
    return counts


def reprioritised(project: Any, round_: Any) -> int:
    """Crowd tasks older than the round that its publish moved into its priority band (tasks it created are
    counted as inserts)."""
    from annotations import queue
    from annotations.models import AnnotationTask

    band = queue.ROUND_PRIORITY_STEP * round_.number - 1
    tasks = AnnotationTask.objects.filter(project=project, kind="crowd", priority__gt=band)
    return tasks.filter(created_at__lt=round_.started_at).count()


def round_under_load(
    project: Any,
    annotators: int,
    seed_embeddings: Callable[[Any], None],
    processes: int = 2,
    pace: float = 2.0,
    profile: str = "",
) -> dict[str, Any]:
    """One head-mode round while annotators work: stage times, RSS, rows written, lease latency."""
    from annotations import consensus
    from learner import pipeline, services

    seed_embeddings(project)
    # The consensus rows cast_vote would have kept for the votes the SQL build inserted, so the round's
    # snapshot finds a project as a live one would be (and creates none of them itself).
    started, rss = time.perf_counter(), peak_rss_mb()
    rows = consensus.recompute_project_consensus(project)
    print(
        f"consensus of the built votes in {time.perf_counter() - started:.1f} s: {rows:,} patches; "
        f"peak RSS {rss:,.0f} MB before, {peak_rss_mb():,.0f} MB after",
        flush=True,
    )
    crowd: Annotators | AnnotatorProcesses = (
        AnnotatorProcesses(project, annotators, processes, pace)
        if processes > 0 and annotators > 0
        else Annotators(project, annotators, pace=pace)
    )
    crowd.start()
    time.sleep(5)
    before_rows = table_counts()
    rss_before = peak_rss_mb()
    crowd.phase = "during"
    round_ = services.start_round(project, launch=False)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    round_ = pipeline.run_round(round_.pk)
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    crowd.phase = "after"
    time.sleep(5)
    crowd.stop()
    after_rows = table_counts()
    written = {t: after_rows.get(t, 0) - before_rows.get(t, 0) for t in after_rows}
    written = {t: n for t, n in written.items() if n}
    # Rows the round updated rather than inserted: the crowd tasks publish moved into the round's band
    # (the batch above ROUND_PRIORITY_STEP x number, the uncertain tail just below it). Only publish writes
    # a priority, so the band counts them exactly, whatever the annotators did to those tasks since.
    written["annotations_annotationtask[crowd, re-prioritised]"] = reprioritised(project, round_)
    print(f"round {round_.number}: {round_.state} in {seconds:.1f} s {round_.error}", flush=True)
    for stage, value in (round_.timings or {}).items():
        print(f"  stage {stage:<10} {value:8.2f} s")
    print(f"  rows written: {written}")
    phases = {phase: show(f"annotator lease, {phase} the round", values) for phase, values in crowd.lease.items()}
    print(f"  empty leases: {crowd.empty}; annotator errors: {crowd.errors[:3]}")
    return {
        "state": round_.state,
        "error": round_.error,
        "round_seconds": seconds,
        "timings": round_.timings,
        "round_peak_rss_mb": max(peak_rss_mb(), rss_before),
        "rss_before_round_mb": rss_before,
        "rows_written": written,
        "lease": phases,
        "empty": crowd.empty,
        "batch_size": project.batch_size,
    }


GOLD_SHARE = 0.2  # of the voted patches: gold, with an expert's label (the truth the build voted around)
CERTIFICATION = 0.85  # the build's students are right 85% of the time: about half fall below


def routing_and_certification(project: Any, batch: int) -> dict[str, Any]:
    """The two per-project passes of the crowd policy at this size, timed on the built project:

    - certification: gold on a share of the voted patches (an expert's vote each), a certification
      threshold the students straddle, then ``students.refresh_students`` (every member's gold counts in one
      statement) and the consensus of every patch whose students changed side
      (``recompute_students_patches``);
    - routing by value: the crowd's Dawid-Skene fit (``reliability.refresh``), then ``expert_routing.split_batch``
      on a round-sized batch of open patches with a model posterior for each.
    """
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.db import connection

    from annotations import expert_routing, reliability, students
    from annotations.models import AnnotationTask, LabelClass, Membership

    expert = get_user_model().objects.create(username=f"scale-expert-{project.pk}")
    Membership.objects.create(user=expert, project=project, role="expert")
    label_ids = list(LabelClass.objects.filter(project=project).order_by("order").values_list("pk", flat=True))
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH voted AS (SELECT DISTINCT patch_id FROM annotations_vote WHERE project_id = %(p)s),
            gold AS (
                UPDATE annotations_patch p SET is_gold = true FROM voted
                WHERE p.id = voted.patch_id AND (abs(hashint8(p.id + 7)) %% 1000) < %(share)s * 1000
                RETURNING p.id
            )
            INSERT INTO annotations_vote
                (project_id, patch_id, annotator_id, label_id, role, time_spent_ms, is_active, created_at)
            SELECT %(p)s, gold.id, %(expert)s, (%(labels)s::bigint[])[1 + gold.id %% 3], 'expert', 2000, true, now()
            FROM gold
            """,
            {"p": project.pk, "share": GOLD_SHARE, "expert": expert.pk, "labels": label_ids},
        )
        n_gold = cursor.rowcount
        cursor.execute("ANALYZE annotations_patch, annotations_vote")
    project.certification_threshold = CERTIFICATION
    project.save(update_fields=["certification_threshold"])
    started = time.perf_counter()
    changed = students.refresh_students(project, recompute=False)
    refresh_s = time.perf_counter() - started
    started = time.perf_counter()
    recomputed = students.recompute_students_patches(project, changed)
    recompute_s = time.perf_counter() - started
    print(
        f"certification at {CERTIFICATION}: {n_gold:,} gold patches; gold counts of every member in {refresh_s:.2f} s, "
        f"{len(changed)} students changed side, consensus of their {recomputed:,} patches in {recompute_s:.2f} s",
        flush=True,
    )
    started = time.perf_counter()
    fit = reliability.refresh(project)
    fit_s = time.perf_counter() - started
    project.expert_routing = "value"
    project.save(update_fields=["expert_routing"])
    ids = list(
        AnnotationTask.objects.filter(project=project, kind="crowd", state="open")
        .order_by("-priority")
        .values_list("patch_id", flat=True)[:batch]
    )
    proba = np.random.default_rng(0).dirichlet(np.full(len(label_ids), 0.5), size=len(ids))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        split = expert_routing.split_batch(project, ids, proba)
        times.append(time.perf_counter() - started)
    print(
        f"routing by value: the crowd's fit ({fit.n_votes if fit else 0:,} votes) in {fit_s:.2f} s; "
        f"a batch of {len(ids):,}: {len(split.expert):,} to experts, {len(split.crowd):,} to the crowd",
        flush=True,
    )
    routing = show(f"split_batch, {len(ids):,} patches", times)
    return {
        "gold_patches": n_gold,
        "certification_refresh_s": round(refresh_s, 3),
        "certification_changed_students": len(changed),
        "certification_recomputed_patches": recomputed,
        "certification_recompute_s": round(recompute_s, 3),
        "reliability_fit_s": round(fit_s, 3),
        "routing_batch": len(ids),
        "routing_to_experts": len(split.expert),
        "routing_split_median_ms": routing["median_ms"],
    }


def seed_embeddings(project: Any) -> None:
    """Synthetic vectors in the round's embedding store (one file per slide), clustered by label, so the
    round finds every embedding cached and reads no pixels."""
    from learner import embedding
    from learner.conf import learner_settings

    cfg = learner_settings()
    backbone = embedding.platform_backbone(project.backbone, cfg)
    started = time.perf_counter()
    n = embedding.write_synthetic_embeddings(project, backbone, cfg, seed=0)
    print(
        f"synthetic embeddings: {n:,} x {backbone.num_features} float32 "
        f"({n * backbone.num_features * 4 / 2**30:.1f} GiB) in {time.perf_counter() - started:.1f} s "
        f"under {embedding.cache_dir(cfg)}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=1_000_000)
    parser.add_argument("--slides", type=int, default=100)
    parser.add_argument("--sizes", default="10000,100000", help="smaller projects measured for flatness")
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument(
        "--annotator-processes",
        type=int,
        default=2,
        help="processes the annotator threads are spread over (0: threads in the round's own process)",
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=2.0,
        help="seconds from one lease to the next per annotator during the round (2: a fast student, 30 votes a minute)",
    )
    parser.add_argument("--profile", default="", help="cProfile the round into this file (and print its top)")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument(
        "--vote-share",
        type=float,
        default=VOTE_SHARE,
        help="share of the patches with three crowd votes each (0.9 of 1.1M patches: about 3M votes)",
    )
    parser.add_argument("--no-round", action="store_true")
    parser.add_argument(
        "--no-routing", action="store_true", help="skip the certification refresh and routing-by-value timings"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    embedded.ensure_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory
    os.environ.setdefault("SECRET_KEY", "bench-scale-" + "x" * 40)
    # The round's embedding store and weights in a scratch folder (a million synthetic vectors are 7 GiB),
    # removed at the end unless --keep.
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    os.environ.setdefault("LEARNER_CACHE_DIR", str(scratch / "cache"))
    os.environ.setdefault("LEARNER_WEIGHTS_DIR", str(scratch / "models"))
    try:
        return run(args)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    with scratch_database(args.keep) as url:
        os.environ["DATABASE_URL"] = url
        os.environ["DATABASE_POOL"] = "0"  # threads each keep their own connection
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, database {url.rsplit('/', 1)[-1]}")
        # the smaller sizes below --patches, then --patches itself (each size built once)
        sizes = [*sorted({int(s) for s in args.sizes.split(",") if s and int(s) < args.patches}), args.patches]
        figures: dict[int, dict[str, Any]] = {}
        largest = None
        for size in sizes:
            project = build_project(size, min(args.slides, max(1, size // 1000)), f"p{size}", args.vote_share)
            print(f"-- {size:,} patches")
            figures[size] = queue_figures(project, args.pairs, plan=size == args.patches)
            largest = project
        base = figures[sizes[0]]["lease_vote"]["p95_ms"]
        top = figures[args.patches]["lease_vote"]["p95_ms"]
        print(f"lease + vote p95 at {args.patches:,} vs {sizes[0]:,}: {top / base:.2f}x (goal: flat, <= 20 ms)")
        result: dict[str, Any] = {
            "patches": args.patches,
            "lease_vote_p95_ms_1m": top,
            "queue_stats_ms_1m": figures[args.patches]["queue_stats"]["median_ms"],
            "queue_counts_ms_1m": figures[args.patches]["queue_counts"]["median_ms"],
            "lease_vote_p95_ms_by_size": {str(s): figures[s]["lease_vote"]["p95_ms"] for s in sizes},
        }
        if not args.no_round and largest is not None:
            measured = round_under_load(
                largest, args.annotators, seed_embeddings, args.annotator_processes, args.pace, args.profile
            )
            result.update(
                round_seconds=measured["round_seconds"],
                round_peak_rss_mb=measured["round_peak_rss_mb"],
                rss_before_round_mb=measured["rss_before_round_mb"],
                round_timings=measured["timings"],
                rows_written_by_table=measured["rows_written"],
                lease_p95_ms_before_round=measured["lease"]["before"]["p95_ms"],
                lease_median_ms_during_round=measured["lease"]["during"]["median_ms"],
                lease_max_ms_during_round=measured["lease"]["during"]["max_ms"],
                leases_during_round=measured["lease"]["during"]["n"],
                lease_p95_ms_during_round=measured["lease"]["during"]["p95_ms"],
                empty_leases_during_round=measured["empty"]["during"],
                # what the round inserted; consensus rows are the annotators' new votes meanwhile
                rows_written_per_round=sum(
                    n for table, n in measured["rows_written"].items() if table != "annotations_consensus"
                ),
                rows_written_goal=3 * measured["batch_size"] + args.slides,
                consensus_rows_created_during_round=measured["rows_written"].get("annotations_consensus", 0),
                round_state=measured["state"],
                annotators=args.annotators,
                annotator_processes=args.annotator_processes,
                annotator_pace_s=args.pace,
                load_average=list(os.getloadavg()),
            )
        if not args.no_routing and largest is not None:
            result.update(routing_and_certification(largest, largest.batch_size))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
