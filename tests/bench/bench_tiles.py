"""Tile serving through the real ASGI server (histoloop.serve) against large-image's getTile in-process.

    .venv/bin/python tests/bench/bench_tiles.py [--rounds 3] [--think 1.0]

Uses DATABASE_URL/REDIS_URL like manage.py (embedded services when unset), a throw-away MEDIA_ROOT,
and the TCGA slide from the shared data set. It creates a bench project, ingests the slide, logs a
member in (session cookie) and removes all of it at the end.

What is measured, on the slide's native levels (z = levels-1 and levels-2; the coarser levels are
synthesised by large-image and cost the same in both paths):

- in-process: ``source.getTile(x, y, z)`` on every tile once, 1 thread and 16 threads;
- HTTP: ``GET /api/v1/slides/{id}/tiles/{z}/{x}/{y}.jpeg`` on the same tiles, 1 and 16 keep-alive
  clients (stdlib http.client in threads);
- field of view: 16 clients each load 4x3-tile views with 6 connections (like a browser), pausing
  ``--think`` seconds between views, and with no pause (saturated).

Every phase starts cold: large-image's caches are cleared in-process, and the server is restarted
before each HTTP phase, so no request is answered from a cache and every tile is distinct.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.servers import asgi_server  # noqa: E402

Tile = tuple[int, int, int]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, latencies: list[float], wall: float) -> dict:
    row = {
        "name": name,
        "n": len(latencies),
        "median_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "per_s": len(latencies) / wall,
    }
    print(f"{name:<34} n={row['n']:<4} median {row['median_ms']:7.2f} ms   p95 {row['p95_ms']:7.2f} ms   "
          f"{row['per_s']:7.1f} /s")  # fmt: skip
    return row


def run_concurrently(items: list, workers: int, work: Callable[[object, dict], float]) -> tuple[list[float], float]:
    """Run ``work(item, state)`` over items with ``workers`` threads (one state dict per thread)."""
    lock = threading.Lock()
    pending = list(items)
    latencies: list[float] = []

    def worker() -> None:
        state: dict = {}
        while True:
            with lock:
                if not pending:
                    break
                item = pending.pop()
            latency = work(item, state)
            with lock:
                latencies.append(latency)
        for conn in state.values():
            if hasattr(conn, "close"):
                conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def http_get(state: dict, port: int, path: str, cookie: str, key: object = "conn") -> bytes:
    conn = state.get(key)
    if conn is None:
        conn = state[key] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Cookie": cookie})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} -> {response.status}: {body[:200]!r}")
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--slide", default=str(REPO.parent / "shared" / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs")
    )
    parser.add_argument("--rounds", type=int, default=3, help="field-of-view rounds (each on a fresh server)")
    parser.add_argument("--think", type=float, default=1.0, help="seconds a viewer pauses between views")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    slide_file = Path(args.slide)
    if not slide_file.exists():
        print(f"The benchmark slide is missing: {slide_file}", file=sys.stderr)
        return 2

    embedded.ensure_environment()
    media = Path(tempfile.mkdtemp(prefix="histoloop-bench-media-"))
    os.environ["MEDIA_ROOT"] = str(media)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests
    import django

    django.setup()
    import large_image
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client

    from annotations.models import Project, Role
    from annotations.slides import ingest, tiles
    from tests.factories import ProjectFactory, member

    call_command("migrate", verbosity=0)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    project = ProjectFactory(name=f"bench-tiles-{os.getpid()}-{int(time.time())}")
    user = member(project, Role.CROWD, username=f"bench-viewer-{os.getpid()}-{int(time.time())}")
    log = media / "server.log"
    try:
        slide = ingest.add_slide_from_path(project, slide_file, launch=False)
        slide = ingest.ingest(slide.pk)
        assert slide is not None and slide.status == "ready", slide and slide.error
        client = Client()
        client.force_login(user)
        cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        path = tiles.slide_path(slide)
        geometry = tiles.pyramid(tiles.open_source(path))
        native = [geometry.levels - 1, geometry.levels - 2]
        all_tiles: list[Tile] = [
            (z, x, y)
            for z in native
            for x in range(geometry.tile_counts(z)[0])
            for y in range(geometry.tile_counts(z)[1])
        ]
        rng = random.Random(args.seed)
        rng.shuffle(all_tiles)
        env = dict(os.environ)
        print(f"Slide {slide_file.name}: {geometry.width}x{geometry.height}, levels {geometry.levels}, "
              f"{len(all_tiles)} distinct tiles on levels {native}; {os.cpu_count()} CPUs\n")  # fmt: skip

        def in_process(workers: int) -> dict:
            large_image.cache_util.cachesClear()
            source = tiles.open_source(path)
            source.getTile(0, 0, 0)  # open + warm the code path on a tile outside the set

            def work(tile: object, state: dict) -> float:
                z, x, y = tile  # type: ignore[misc]
                start = time.perf_counter()
                source.getTile(x, y, z)
                return time.perf_counter() - start

            latencies, wall = run_concurrently(all_tiles, workers, work)
            return summary(f"in-process getTile, {workers} thread(s)", latencies, wall)

        def over_http(workers: int) -> dict:
            with asgi_server(env, log) as port:
                http_get({}, port, f"/api/v1/slides/{slide.pk}/tiles/0/0/0.jpeg", cookie)  # auth + open, not timed

                def work(tile: object, state: dict) -> float:
                    z, x, y = tile  # type: ignore[misc]
                    start = time.perf_counter()
                    http_get(state, port, f"/api/v1/slides/{slide.pk}/tiles/{z}/{x}/{y}.jpeg", cookie)
                    return time.perf_counter() - start

                latencies, wall = run_concurrently(all_tiles, workers, work)
            return summary(f"HTTP (ASGI server), {workers} client(s)", latencies, wall)

        def views(z: int) -> list[list[Tile]]:
            columns, rows = geometry.tile_counts(z)
            return [
                [(z, x + dx, y + dy) for dx in range(4) for dy in range(3)]
                for x in range(0, columns - 3, 4)
                for y in range(0, rows - 2, 3)
            ]

        def field_of_view(think: float) -> dict:
            latencies: list[float] = []
            wall = 0.0
            for _ in range(args.rounds):
                fovs = views(geometry.levels - 1) + views(geometry.levels - 2)
                rng.shuffle(fovs)
                with asgi_server(env, log) as port:
                    http_get({}, port, f"/api/v1/slides/{slide.pk}/tiles/0/0/0.jpeg", cookie)
                    pool = ThreadPoolExecutor(max_workers=16 * 6)

                    def work(fov: object, state: dict, pool: ThreadPoolExecutor = pool) -> float:
                        if state.get("loaded") and think:
                            time.sleep(rng.uniform(0.5, 1.5) * think)
                        state["loaded"] = True
                        start = time.perf_counter()
                        # A browser opens ~6 connections per host; each fetches its share of the 12 tiles.
                        lanes = [fov[i::6] for i in range(6)]  # type: ignore[index]

                        def lane(tiles_in_lane: list[Tile], index: int) -> None:
                            for z, x, y in tiles_in_lane:
                                http_get(state, port, f"/api/v1/slides/{slide.pk}/tiles/{z}/{x}/{y}.jpeg", cookie,
                                         key=("lane", threading.get_ident(), index))  # fmt: skip

                        for future in [pool.submit(lane, tiles_in_lane, i) for i, tiles_in_lane in enumerate(lanes)]:
                            future.result()
                        return time.perf_counter() - start

                    round_latencies, round_wall = run_concurrently(fovs, 16, work)
                    pool.shutdown()
                latencies += round_latencies
                wall += round_wall
            label = f"12-tile view, 16 clients, think {think:g}s" if think else "12-tile view, 16 clients, no pause"
            return summary(label, latencies, wall)

        one_local = in_process(1)
        many_local = in_process(16)
        one_http = over_http(1)
        many_http = over_http(16)
        print()
        fov = field_of_view(args.think)
        fov_saturated = field_of_view(0.0)
        print()
        print(f"HTTP / in-process median, 1 client:   {one_http['median_ms'] / one_local['median_ms']:.2f}x")
        print(f"HTTP / in-process median, 16 clients: {many_http['median_ms'] / many_local['median_ms']:.2f}x")
        print(f"HTTP / in-process tiles/s, 16:        {many_http['per_s'] / many_local['per_s']:.2f}x")
        print(f"Field of view p95 (think {args.think:g}s):     {fov['p95_ms']:.0f} ms (goal < 150 ms)")
        print(f"Field of view p95 (saturated):        {fov_saturated['p95_ms']:.0f} ms")
    finally:
        Project.objects.filter(pk=project.pk).delete()
        user.delete()
        shutil.rmtree(media, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
