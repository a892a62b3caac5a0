"""Next-task + vote latency for 50 concurrent annotators through the real ASGI server and PostgreSQL.

    .venv/bin/python tests/bench/bench_queue.py [--annotators 50] [--seconds 30] [--think 3] [--workers 1,2]

Uses DATABASE_URL/REDIS_URL like manage.py (embedded services when unset). It creates a bench
project with 3,000 patches (rows only: no pixels are read), 50 crowd members with API tokens,
and removes all of it at the end.

Measured:
- baseline, in-process: ``queue.lease_next_task`` + ``voting.cast_vote`` called directly, one thread;
- HTTP through the real ASGI server (``histoloop.serve``: uvicorn) with 1 worker process (the
  baseline: one process, as with daphne) and with ``--workers`` processes; 50 annotator threads,
  each: POST next-task, POST vote, repeat. Paced like people: each annotator starts at a random
  moment within the first think time, then waits an exponential think time (mean ``--think`` s)
  between next-task and vote; and saturated (no think time: the server's ceiling on this machine).
  Each server first gets ``--warmup`` seconds of paced traffic that is not recorded (first
  requests of a process import and compile what Django needs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench.bench_tiles import percentile  # noqa: E402
from tests.servers import asgi_server  # noqa: E402


def describe(name: str, values: list[float], wall: float | None = None) -> dict:
    row = {
        "name": name,
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 95) * 1000,
    }
    rate = f"   {len(values) / wall:7.1f} /s" if wall else ""
    print(f"{name:<44} n={row['n']:<5} median {row['median_ms']:7.2f} ms   p95 {row['p95_ms']:7.2f} ms{rate}")
    return row


def setup(n_annotators: int, n_patches: int):  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from annotations.models import LabelClass, Membership, Patch, Project, Slide
    from tests.factories import queue_every_patch

    project = Project.objects.create(name=f"bench-queue-{os.getpid()}", votes_required=3, gold_rate=0.0)
    for i, name in enumerate(["adenocarcinoma", "benign", "squamous"]):
        LabelClass.objects.create(project=project, name=name, hotkey=str(i + 1), order=i)
    slides = [
        Slide.objects.create(
            project=project,
            name=f"s{i}.svs",
            status="ready",
            width=50_000,
            height=50_000,
            checksum=f"{os.getpid():08x}{i:056x}",
        )
        for i in range(10)
    ]
    Patch.objects.bulk_create(
        [
            Patch(
                project=project,
                slide=slides[i % 10],
                x=(i // 10) % 200 * 224,
                y=(i // 2000) * 224,
                size=224,
                magnification=20,
            )
            for i in range(n_patches)
        ]
    )
    queue_every_patch(project)
    User = get_user_model()
    users = [User.objects.create(username=f"bench-{os.getpid()}-{i}") for i in range(n_annotators + 1)]
    Membership.objects.bulk_create([Membership(user=u, project=project, role="crowd") for u in users])
    tokens = [Token.objects.create(user=u).key for u in users[1:]]
    return project, users, tokens


def in_process(project, user, n: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    from annotations import queue, voting

    lease_t, vote_t = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        task = queue.lease_next_task(project, user, "crowd")
        t1 = time.perf_counter()
        voting.cast_vote(project, user, "crowd", patch_id=task.patch_id, label="benign", task_id=task.pk)
        t2 = time.perf_counter()
        lease_t.append(t1 - t0)
        vote_t.append(t2 - t1)
    return lease_t, vote_t


def annotate_over_http(port: int, project_id: int, tokens: list[str], seconds: float, think: float) -> dict:
    lock = threading.Lock()
    lease_t: list[float] = []
    vote_t: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    stop_at = start + seconds

    def post(conn: http.client.HTTPConnection, path: str, token: str, body: dict | None = None):  # type: ignore[no-untyped-def]
        payload = json.dumps(body or {})
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        try:
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # The server closed an idle keep-alive connection: reconnect, as a browser does.
            conn.close()
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
        return response.status, response.read()

    def annotator(token: str, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        if think:
            time.sleep(rng.uniform(0, think))  # people do not all click at the same instant
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            status, body = post(conn, f"/api/v1/projects/{project_id}/next-task/", token)
            t1 = time.perf_counter()
            if status != 200:
                with lock:
                    errors.append(f"next-task {status}")
                break
            task = json.loads(body)
            if think:
                time.sleep(rng.expovariate(1 / think))
            t2 = time.perf_counter()
            status, body = post(
                conn,
                f"/api/v1/projects/{project_id}/votes/",
                token,
                {"patch": task["patch"]["id"], "task": task["id"], "label": "benign"},
            )
            t3 = time.perf_counter()
            with lock:
                lease_t.append(t1 - t0)
                vote_t.append(t3 - t2)
                if status != 201:
                    errors.append(f"vote {status} {body[:100]!r}")
        conn.close()

    threads = [threading.Thread(target=annotator, args=(tok, i)) for i, tok in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Rates are per second of the measured window (requests still in flight at its end are counted).
    return {"lease": lease_t, "vote": vote_t, "errors": errors, "wall": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--think", type=float, default=3.0, help="mean think time between votes (s)")
    parser.add_argument("--workers", default="1,2", help="server worker process counts to measure")
    parser.add_argument("--warmup", type=float, default=5, help="unrecorded paced traffic per server (s)")
    args = parser.parse_args()

    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests
    embedded.ensure_environment()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    project, users, tokens = setup(args.annotators, 3000)
    print(f"{args.annotators} annotators, project {project.pk}, {os.cpu_count()} cores")
    try:
        lease_t, vote_t = in_process(project, users[0], 200)
        base_lease = describe("in-process lease_next_task", lease_t)
        base_vote = describe("in-process cast_vote", vote_t)
        log = REPO / "var" / "bench-queue-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        baseline: dict[str, dict] = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            with asgi_server(dict(os.environ), log, workers=workers) as port:
                annotate_over_http(port, project.pk, tokens, args.warmup, args.think)
                for label, think in ((f"paced (think {args.think:g}s)", args.think), ("saturated (no think)", 0.0)):
                    result = annotate_over_http(port, project.pk, tokens, args.seconds, think)
                    print(
                        f"-- HTTP, {workers} server process(es), {args.annotators} annotators, {label}: "
                        f"{len(result['errors'])} errors"
                    )
                    lease = describe("  POST next-task", result["lease"], result["wall"])
                    vote = describe("  POST votes", result["vote"], result["wall"])
                    base = baseline.setdefault(label, {"lease": lease, "vote": vote})
                    print(
                        f"  p95 vs 1 process: next-task {lease['p95_ms'] / base['lease']['p95_ms']:.2f}x, "
                        f"vote {vote['p95_ms'] / base['vote']['p95_ms']:.2f}x; median vs in-process: "
                        f"next-task {lease['median_ms'] / base_lease['median_ms']:.1f}x, "
                        f"vote {vote['median_ms'] / base_vote['median_ms']:.1f}x; goal p95 < 50 ms"
                    )
                    if result["errors"]:
                        print("  first errors:", result["errors"][:3])
    finally:
        from annotations.models import Vote

        Vote.objects.filter(project=project).delete()
        project.delete()
        for user in users:
            user.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
