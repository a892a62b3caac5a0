"""Tile serving through the real ASGI server (histoloop.serve) against the same tiles in-process.

    .venv/bin/python tests/bench/bench_tiles.py [--slide PATH ...] [--tiles 240] [--views 48] [--think 1.0]

Default slides: the real-size JPEG fixture from ``make_wsi.py`` (made if missing) and the JPEG 2000
TCGA slide from the shared data set. Uses the servers of DATABASE_URL/REDIS_URL (embedded when
unset) with a scratch database and a throw-away MEDIA_ROOT; ingests each slide, logs a member in
(session cookie) and removes everything at the end. Every figure is printed with the machine's
1-minute load average at the time, since the machine is shared.

Per slide, on a random sample of distinct tiles from the two finest levels:

- in-process: ``tiles.tile_jpeg`` (what the route serves: a stored JPEG passed through, or
  rendered and put in the shared cache) and large-image's ``getTile`` (the issue's baseline; on
  JPEG 2000 that is the decode + re-encode cost per tile, the physical floor there), and for
  JPEG 2000 the decode alone (``numpyAllowed='always'``);
- HTTP with 1 and 2 server processes: ``GET /api/v1/slides/{id}/tiles/{z}/{x}/{y}.jpeg`` with 1
  and 16 keep-alive clients, and 16 viewers each loading 12-tile (4 x 3) fields of view over 6
  connections (like a browser), pausing ``--think`` s between views;
- cold: every phase on a freshly started server, with the slide's keys deleted from the shared
  Redis tile cache and large-image's caches empty (the OS page cache is left alone: the machine is
  shared); warm: the same requests again on the same server.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.bench import make_wsi  # noqa: E402
from tests.bench.bench_scale import scratch_database  # noqa: E402
from tests.servers import asgi_server  # noqa: E402

Tile = tuple[int, int, int]
TCGA = REPO.parent / "shared" / "data" / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def load() -> float:
    return os.getloadavg()[0]


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
        "load": load(),
    }
    print(f"  {name:<46} n={row['n']:<4} median {row['median_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms  "
          f"{row['per_s']:7.1f}/s  load {row['load']:.2f}", flush=True)  # fmt: skip
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
        conn = state[key] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path, headers={"Cookie": cookie})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} -> {response.status}: {body[:200]!r}")
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", action="append", type=Path, help="default: the real-size fixture and TCGA")
    parser.add_argument("--tiles", type=int, default=240, help="distinct tiles per HTTP phase")
    parser.add_argument("--views", type=int, default=48, help="12-tile views per field-of-view phase")
    parser.add_argument("--think", type=float, default=1.0, help="seconds a viewer pauses between views")
    parser.add_argument("--processes", default="1,2", help="server process counts to measure")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fixture = make_wsi.default_path(80_000, 60_000)
    slides = args.slide or [fixture, TCGA]
    if fixture in slides and not fixture.exists():
        print(f"Making the fixture {fixture} (load {load():.2f})", flush=True)
        subprocess.run([sys.executable, str(Path(make_wsi.__file__)), "--out", str(fixture)], check=True)
    for slide_file in slides:
        if not slide_file.exists():
            print(f"The benchmark slide is missing: {slide_file}", file=sys.stderr)
            return 2

    embedded.ensure_environment()
    os.environ.setdefault("DEBUG", "0")  # DEBUG keeps every query in memory, and serves like development
    os.environ.setdefault("SECRET_KEY", "bench-tiles-" + "x" * 40)
    os.environ.setdefault("SECURE_SSL_REDIRECT", "0")  # plain HTTP on loopback
    media = Path(tempfile.mkdtemp(prefix="histoloop-bench-media-"))
    os.environ["MEDIA_ROOT"] = str(media)
    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests
    with scratch_database(keep=False) as url:
        os.environ["DATABASE_URL"] = url
        try:
            return run(args, slides, media)
        finally:
            shutil.rmtree(media, ignore_errors=True)


def run(args: argparse.Namespace, slides: list[Path], media: Path) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client

    from annotations.models import Role
    from tests.factories import ProjectFactory, member

    call_command("migrate", verbosity=0)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    project = ProjectFactory(name="bench-tiles")
    user = member(project, Role.CROWD, username="bench-viewer")
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    processes = [int(p) for p in args.processes.split(",") if p]
    log = media / "server.log"
    env = dict(os.environ)
    rng = random.Random(args.seed)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()}; {args.tiles} tiles per HTTP phase, "
          f"{args.views} views per field-of-view phase, think {args.think:g} s\n", flush=True)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}

    for slide_file in slides:
        results[slide_file.name] = bench_slide(slide_file, args, project, cookie, env, log, processes, rng)
        print(flush=True)

    print("Ratios and goals (each figure above carries its load average):")
    for name, row in results.items():
        kind = "JPEG, passed through" if row["passthrough"] else "rendered (JPEG 2000)"
        print(f"{name} ({kind}):")
        for count in processes:
            http1 = row[f"http_{count}p_1c_warm"]["median_ms"]
            get_tile, served_warm = row["getTile"]["median_ms"], row["served_warm"]["median_ms"]
            print(
                f"  {count} process(es): HTTP 1-client median warm {http1:.2f} ms = "
                f"{http1 / get_tile:.2f}x large-image getTile ({get_tile:.2f} ms), "
                f"{http1 / served_warm:.1f}x in-process tile_jpeg ({served_warm:.3f} ms): "
                f"web stack + HTTP {http1 - served_warm:.2f} ms"
            )
            print(
                f"  {count} process(es): 12-tile view p95 warm {row[f'fov_{count}p_warm']['p95_ms']:.0f} ms, "
                f"cold {row[f'fov_{count}p_cold']['p95_ms']:.0f} ms"
                + (" (goals: <= 150 warm, <= 400 cold)" if row["passthrough"] else "")
            )
        django1 = row["django_1c"]["median_ms"]
        print(
            f"  through the whole Django stack instead (1 process, warm): 1-client median {django1:.2f} ms "
            f"({django1 - row['served_warm']['median_ms']:.2f} ms web stack + HTTP), "
            f"16 clients {row['django_16c']['median_ms']:.2f} ms"
        )
        asgi = {name: figure["median_ms"] for name, figure in row["asgi"].items()}
        print("  one request inside one process: " + ", ".join(f"{n} {v:.3f} ms" for n, v in asgi.items()))
        if "decode" in row:
            print(
                f"  decode cost per tile {row['decode']['median_ms']:.1f} ms median, decode + encode "
                f"{row['getTile']['median_ms']:.1f} ms (the floor for a cold JPEG 2000 tile)"
            )
    return 0


def bench_slide(
    slide_file: Path,
    args: argparse.Namespace,
    project: Any,
    cookie: str,
    env: dict,
    log: Path,
    processes: list[int],
    rng: random.Random,
) -> dict[str, Any]:
    """Every phase for one slide; the figures by phase."""
    import large_image

    from annotations.slides import ingest, tiles

    started = time.perf_counter()
    slide = ingest.ingest(ingest.add_slide_from_path(project, slide_file, launch=False).pk)
    assert slide is not None and slide.status == "ready", slide and slide.error
    path = tiles.slide_path(slide)
    geometry = tiles.pyramid(tiles.open_source(path))
    native = [geometry.levels - 1, geometry.levels - 2]
    stored = tiles.stored_tiles(path, slide.checksum)
    passthrough = sorted(stored.levels) if stored else []
    print(f"{slide_file.name}: {geometry.width} x {geometry.height}, {geometry.levels} levels, "
          f"ingested in {time.perf_counter() - started:.1f} s; stored JPEG passed through on z {passthrough}; "
          f"tiles from z {native}", flush=True)  # fmt: skip

    def views_at(z: int) -> list[list[Tile]]:
        columns, rows = geometry.tile_counts(z)
        return [
            [(z, x + dx, y + dy) for dx in range(4) for dy in range(3)]
            for x in range(0, columns - 3, 4)
            for y in range(0, rows - 2, 3)
        ]

    all_views = views_at(native[0]) + views_at(native[1])
    rng.shuffle(all_views)
    # Each phase starts cold (caches cleared, a fresh server), so phases may share tiles.
    sample = [tile for view in all_views for tile in view][: args.tiles]
    fov_views = all_views[: args.views]

    def clear_caches() -> None:
        large_image.cache_util.cachesClear()
        tiles.clear_stored_tiles()
        client_ = tiles.shared_cache.client()
        keys = list(client_.scan_iter(match=f"{tiles.TILE_CACHE_PREFIX}:*:{slide.checksum}:*", count=1000))
        if keys:
            client_.delete(*keys)

    row: dict[str, Any] = {"passthrough": bool(passthrough)}

    # In-process.
    clear_caches()
    tiles.tile_jpeg(path, 0, 0, 0, slide.checksum)  # open the source and the stored-tile index

    def in_process(label: str, call: Callable[[int, int, int], Any]) -> dict:
        def work(tile: object, state: dict) -> float:
            z, x, y = tile  # type: ignore[misc]
            start = time.perf_counter()
            call(z, x, y)
            return time.perf_counter() - start

        latencies, wall = run_concurrently(sample, 1, work)
        return summary(label, latencies, wall)

    def served(z: int, x: int, y: int) -> bytes:
        return tiles.tile_jpeg(path, z, x, y, slide.checksum)

    row["served_cold"] = in_process("in-process tile_jpeg, cold", served)
    row["served_warm"] = in_process("in-process tile_jpeg, warm", served)
    large_image.cache_util.cachesClear()
    source = tiles.open_source(path)
    row["getTile"] = in_process("in-process large-image getTile (uncached)", lambda z, x, y: source.getTile(x, y, z))
    if not passthrough:
        large_image.cache_util.cachesClear()
        decoder = tiles.open_source(path)
        row["decode"] = in_process(
            "in-process decode only (numpy)", lambda z, x, y: decoder.getTile(x, y, z, numpyAllowed="always")
        )
    # Where a tile request's time goes inside one process (no sockets, tiles warm): the ASGI app as
    # served, the whole Django stack, and Django without its middleware.
    row["asgi"] = asgi_in_process(slide.pk, cookie, sample)

    def http_phase(port: int, tile_set: list[Tile], clients: int, label: str) -> dict:
        def work(tile: object, state_: dict) -> float:
            z, x, y = tile  # type: ignore[misc]
            start = time.perf_counter()
            http_get(state_, port, f"/api/v1/slides/{slide.pk}/tiles/{z}/{x}/{y}.jpeg", cookie)
            return time.perf_counter() - start

        latencies, wall = run_concurrently(tile_set, clients, work)
        return summary(label, latencies, wall)

    for count in processes:
        for phase in ("1 client", "16 clients", "views"):
            clear_caches()
            with asgi_server(env, log, workers=count) as port:
                # A process's first request for a slide authorises the credential (each process
                # keeps its own access cache) and opens the file: a start-up cost, not a tile
                # cache's, so it is paid here by 32 connections at once (reaching every process)
                # on the one z = 0 tile, outside the measured levels, and printed on its own.
                first = f"/api/v1/slides/{slide.pk}/tiles/0/0/0.jpeg"

                def first_request(_: int, first: str = first, port: int = port) -> float:
                    start = time.perf_counter()
                    http_get({}, port, first, cookie)
                    return time.perf_counter() - start

                with ThreadPoolExecutor(32) as warm_up:
                    started = list(warm_up.map(first_request, range(32)))
                if phase == "1 client":
                    print(f"  first request of a fresh {count}-process server (sign-in + open): "
                          f"slowest {max(started) * 1000:.0f} ms of 32 at once, load {load():.2f}")  # fmt: skip
                for state in ("cold", "warm"):
                    if phase == "views":
                        row[f"fov_{count}p_{state}"] = field_of_view(
                            port, slide.pk, cookie, fov_views, args.think, rng,
                            f"12-tile view, {count} process(es), 16 viewers, {state}",
                        )  # fmt: skip
                    else:
                        clients = 1 if phase == "1 client" else 16
                        row[f"http_{count}p_{clients}c_{state}"] = http_phase(
                            port, sample, clients, f"HTTP, {count} process(es), {clients:>2} client(s), {state}"
                        )
    # Where the time went before: the same warm tiles through the whole Django stack.
    with asgi_server({**env, "LEAN_TILE_ROUTE": "0"}, log, workers=1) as port:
        http_phase(port, sample, 4, "(filling the caches, not a figure)")
        for clients in (1, 16):
            label = f"HTTP through Django (no lean route), {clients:>2} client(s), warm"
            row[f"django_{clients}c"] = http_phase(port, sample, clients, label)
    return row


def asgi_in_process(slide_id: int, cookie: str, sample: list[Tile]) -> dict[str, dict]:
    """Median cost of one tile request through each ASGI app, called directly in this process."""
    import asyncio

    from django.core.asgi import get_asgi_application
    from django.test import override_settings

    from annotations.slides.lean import LeanTiles

    async def call(app: Any, path: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"cookie", cookie.encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # no disconnect: Django cancels this when the response is sent
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return int(sent[0]["status"])

    django_app = get_asgi_application()
    with override_settings(MIDDLEWARE=[]):
        bare = get_asgi_application()
    apps = {"lean route (as served)": LeanTiles(django_app), "whole Django stack": django_app}
    apps["Django, no middleware"] = bare
    figures = {}

    async def measure() -> None:
        # The first request authorises the credential (the access cache is this process's).
        assert await call(django_app, f"/api/v1/slides/{slide_id}/tiles/0/0/0.jpeg") == 200
        for name, app in apps.items():
            latencies = []
            for z, x, y in sample:
                start = time.perf_counter()
                status = await call(app, f"/api/v1/slides/{slide_id}/tiles/{z}/{x}/{y}.jpeg")
                latencies.append(time.perf_counter() - start)
                assert status == 200, (name, status)
            figures[name] = summary(f"in-process ASGI: {name}", latencies, sum(latencies))

    asyncio.run(measure())
    return figures


def field_of_view(
    port: int, slide_id: int, cookie: str, views: list[list[Tile]], think: float, rng: random.Random, label: str
) -> dict:
    pool = ThreadPoolExecutor(max_workers=16 * 6)

    def work(fov: object, state: dict) -> float:
        if state.get("loaded") and think:
            time.sleep(rng.uniform(0.5, 1.5) * think)
        state["loaded"] = True
        start = time.perf_counter()
        # A browser opens ~6 connections per host; each fetches its share of the 12 tiles.
        lanes = [fov[i::6] for i in range(6)]  # type: ignore[index]

        def lane(tiles_in_lane: list[Tile], index: int) -> None:
            for z, x, y in tiles_in_lane:
                http_get(state, port, f"/api/v1/slides/{slide_id}/tiles/{z}/{x}/{y}.jpeg", cookie,
                         key=("lane", threading.get_ident(), index))  # fmt: skip

        for future in [pool.submit(lane, tiles_in_lane, i) for i, tiles_in_lane in enumerate(lanes)]:
            future.result()
        return time.perf_counter() - start

    try:
        latencies, wall = run_concurrently(list(views), 16, work)
    finally:
        pool.shutdown()
    return summary(label, latencies, wall)


if __name__ == "__main__":
    sys.exit(main())
