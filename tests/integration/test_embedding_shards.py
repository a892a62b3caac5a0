"""Embedding shards across real Celery worker processes: a round fans its missing embeddings out on the shard
queue, survives a worker killed mid-shard with every patch embedded exactly once, reports a corrupt slide by
name instead of hanging, and finds what background shards after ingest already did (learner.shards).

Two `celery worker` processes (prefork, one child each) consume a queue of this module's own, so the session's
worker (tests/integration/conftest.py) never takes these shards; the round runs in the test process, which
embeds what no worker holds, as a round on a gpu worker does.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tifffile
from amqp.exceptions import ChannelError
from django.conf import settings as django_settings

from annotations.models import Patch, Role, Slide
from annotations.slides import ingest, tiles
from histoloop.celery import app
from learner import embedding, pipeline, reporter, services
from learner import shards as shards_module
from learner.conf import learner_settings
from learner.models import TrainingRound
from tests.conftest import SLIDES_DIR
from tests.factories import ProjectFactory, member
from tests.integration.conftest import test_database_url as database_url
from tests.integration.conftest import wait_for
from tests.integration.test_rounds import collect_events
from tests.servers import start_celery_worker, wait_until_ready

QUEUE = f"shards-test-{os.getpid()}"
SHARD_PATCHES = 4
CMU = SLIDES_DIR / "cmu-1-small-region.svs"
DONE = re.compile(r"Shard ([0-9a-f-]+) of (.*): embedded (\d+) patches")


@dataclass
class Worker:
    name: str  # the node name, for control commands
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def embedded(self, slide: str = "") -> dict[str, int]:
        """Patches each finished shard (by task id) embedded, from this worker's log; of shards naming
        ``slide`` among their slides when given."""
        return {task: int(n) for task, what, n in DONE.findall(self.text()) if slide in what}


def start_worker(label: str, cache_dir: Path, folder: Path) -> Worker:
    log = folder / f"{label}.log"
    name = f"{label}-{os.getpid()}@%h"
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        MEDIA_ROOT=str(django_settings.MEDIA_ROOT),
        LEARNER_CACHE_DIR=str(cache_dir),
        LEARNER_WEIGHTS_DIR=str(django_settings.LEARNER["WEIGHTS_DIR"]),
        OMP_NUM_THREADS="1",  # three embedding processes share two cores
        # torch eager, the slowest backend: a shard lasts long enough to be killed or cancelled mid-way
        # (under ONNX Runtime a 4-patch shard can end before the test acts).
        LEARNER_CPU_BACKEND="torch",
    )
    env.pop("TEST_DATABASE_NAME", None)
    proc = start_celery_worker(env, log, queues=QUEUE, name=name, pool="prefork")
    return Worker(name.replace("%h", socket.gethostname()), proc, log)


@pytest.fixture(scope="module")
def shard_workers(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, ...]]:
    """Two worker processes on this module's queue, sharing an embedding cache with the test process."""
    folder = tmp_path_factory.mktemp("shard-workers")
    cache_dir = folder / "cache"
    workers = tuple(start_worker(label, cache_dir, folder) for label in ("shardsA", "shardsB"))
    try:
        for worker in workers:  # both import Django and torch at once, on a shared machine
            wait_until_ready(worker.proc, worker.log, timeout=180)
        workers[0].cache_dir = cache_dir  # type: ignore[attr-defined]
        yield workers
    finally:
        for worker in workers:
            worker.proc.send_signal(signal.SIGQUIT)  # cold shutdown: leftover no-op shards are not waited for
        for worker in workers:
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=10)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(QUEUE)


@pytest.fixture
def shard_settings(settings: Any, shard_workers: tuple[Worker, ...]) -> tuple[Worker, ...]:
    """The test process's round sends its shards to the workers' queue and reads their cache."""
    settings.LEARNER = {
        **settings.LEARNER,
        "CACHE_DIR": str(shard_workers[0].cache_dir),  # type: ignore[attr-defined]
        "SHARD_QUEUE": QUEUE,
        "SHARD_PATCHES": SHARD_PATCHES,
        "CPU_BACKEND": "torch",  # as the workers (start_worker)
    }
    return shard_workers


def add_slide(project: Any, path: Path) -> Slide:
    slide = ingest.add_slide_from_path(project, path, launch=False)
    ingest.ingest(slide.pk)
    slide.refresh_from_db()
    assert slide.status == Slide.Status.READY, slide.error
    return slide


def cmu_crop(folder: Path, name: str, top: int, left: int, height: int, width: int) -> Path:
    """A region of the real CMU-1 slide as a JPEG-tiled pyramidal TIFF: small, so a test embeds tens of
    patches, and each test's own content, so no test finds another's embeddings."""
    import large_image

    source = large_image.open(str(CMU))
    region = {"left": left, "top": top, "width": width, "height": height}
    pixels, _ = source.getRegion(region=region, format=large_image.constants.TILE_FORMAT_NUMPY)
    path = folder / name
    write_tiled_tiff(path, np.ascontiguousarray(pixels[:, :, :3]))
    return path


def store_positions(slide: Slide) -> np.ndarray:
    """The (x, y) rows the slide's embedding file holds."""
    cfg = learner_settings()
    project = slide.project
    store = embedding.store_for(embedding.platform_backbone(project.backbone, cfg), project.patch_size, cfg)
    key = embedding.slide_key(slide.checksum, slide.pk, project.patch_size, project.patch_size)
    return np.load(store.vectors_path(key).with_suffix(".xy.npy"))


def run_round_in_thread(project: Any) -> tuple[threading.Thread, dict[str, Any]]:
    round_ = services.start_round(project, launch=False)  # run here, not by the session's worker
    out: dict[str, Any] = {"round": round_.pk}

    def target() -> None:
        from django.db import connection

        try:
            out["result"] = pipeline.run_round(round_.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def queued() -> int:
    """Messages waiting on this module's queue (every priority)."""
    with app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=QUEUE, passive=True).message_count)
        except ChannelError:  # on Redis an emptied queue is no key at all: "no queue"
            return 0


def worker_counts(workers: tuple[Worker, ...], slide: str = "") -> dict[str, int]:
    counts: dict[str, int] = {}
    for worker in workers:
        counts.update(worker.embedded(slide))
    return counts


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90, func_only=True)
def test_a_worker_killed_mid_shard_is_redelivered_and_every_patch_is_embedded_exactly_once(
    shard_settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    a, b = shard_settings
    project = ProjectFactory()
    slide = add_slide(project, cmu_crop(tmp_path, "kill.tiff", 1024, 768, 1280, 1024))
    n = Patch.objects.filter(slide=slide).count()
    assert n > 4 * SHARD_PATCHES, n
    admin = member(project, Role.ADMIN)
    killed: dict[str, Any] = {}
    started: dict[str, Any] = {}

    def kill_a_mid_shard() -> None:
        received = re.compile(r"embed_shard\[([0-9a-f-]+)\] received")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not received.search(a.text()):
            time.sleep(0.05)
        match = received.search(a.text())
        if match is None:
            return
        # Worker A takes nothing more, so the message its dead child held goes back to the queue for B.
        app.control.cancel_consumer(QUEUE, destination=[a.name], reply=True, timeout=5)
        child = a.children()[0]
        killed.update(task=match.group(1), pid=child.pid, finished_before=match.group(1) in a.embedded())
        os.kill(child.pid, signal.SIGKILL)

    def start(events: list[dict]) -> None:
        killer = threading.Thread(target=kill_a_mid_shard, daemon=True)
        killer.start()
        started["thread"], started["out"] = run_round_in_thread(project)
        started["killer"] = killer

    try:
        events = asyncio.run(collect_events(admin, project.pk, start, timeout=70))
        started["thread"].join(timeout=30)
        started["killer"].join(timeout=5)
    finally:
        app.control.add_consumer(QUEUE, destination=[a.name], reply=True, timeout=5)
    round_ = TrainingRound.objects.get(pk=started["out"]["round"])
    assert round_.state == "succeeded", (round_.error, a.text()[-2000:], b.text()[-2000:])

    assert killed.get("task"), f"worker A never received a shard:\n{a.text()[-2000:]}"
    assert not killed["finished_before"], "the kill came after the shard had finished"
    # Worker A's main process notices its child's death and logs it (possibly after the round ended).
    wait_for(lambda: "WorkerLostError" in a.text() or "SIGKILL" in a.text(), timeout=20, message="A's lost child")
    # Redelivered: worker B received the very message A's child died holding.
    wait_for(lambda: f"embed_shard[{killed['task']}] received" in b.text(), timeout=20, message="the redelivery")
    # Exactly once: what the round embedded itself plus what each finished shard embedded is the slide's patch
    # count; a shard embedded twice (or a patch embedded by two processes) would count twice.
    stats = round_.metrics["embedding"]
    assert stats["patches"] == n and stats["missing"] == n and stats["shards"] >= 4
    counts = wait_for(
        lambda: (c := worker_counts((a, b))) and killed["task"] in c and c,
        timeout=20,
        message="the redelivered shard to finish on B",
    )
    assert stats["by_round"] + sum(counts.values()) == n, (stats, counts)
    assert sum(b.embedded().values()) > 0, "worker B embedded nothing"
    positions = store_positions(slide)
    assert len(positions) == n and len(np.unique(positions, axis=0)) == n
    expected = set(map(tuple, Patch.objects.filter(slide=slide).values_list("x", "y")))
    assert set(map(tuple, positions.tolist())) == expected
    # Progress across shards reached the websocket, in order, through the embed stage.
    embed_progress = [e["progress"] for e in events if e["type"] == "round.progress" and e["stage"] == "embed"]
    assert len(embed_progress) >= 2 and embed_progress == sorted(embed_progress)
    assert events[-1]["type"] == "round.finished" and events[-1]["state"] == "succeeded"


def write_tiled_tiff(path: Path, pixels: np.ndarray) -> None:
    """A JPEG-tiled pyramidal TIFF (level 0 plus two reduced levels in SubIFDs) at 0.5 µm/px."""
    options: dict[str, Any] = {
        "tile": (256, 256), "compression": "jpeg", "photometric": "rgb",
        "resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER",
    }  # fmt: skip
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, subifds=2, **options)
        tif.write(pixels[::2, ::2], subfiletype=1, **options)
        tif.write(pixels[::4, ::4], subfiletype=1, **options)


def truncate_tile_under(path: Path, x: int, y: int) -> None:
    """Truncate the level-0 JPEG tile holding (x, y) to its first third (its byte count in the TIFF says so),
    as a copy cut short inside the tile would leave it: the rest of its entropy data and its end marker are gone."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * across + x // page.tilewidth
        counts = list(page.databytecounts)
        counts[index] //= 3
        page.tags["TileByteCounts"].overwrite(counts)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60, func_only=True)
def test_a_corrupt_tile_fails_its_slide_shard_and_the_round_names_the_slide(shard_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import large_image

    project = ProjectFactory()
    good = add_slide(project, cmu_crop(tmp_path, "good.tiff", 2048, 1024, 448, 448))
    bad = add_slide(project, cmu_crop(tmp_path, f"biopsy-{uuid.uuid4().hex[:6]}.tiff", 1280, 896, 896, 896))
    patch = Patch.objects.filter(slide=bad).order_by("y", "x")[len(Patch.objects.filter(slide=bad)) // 2]
    truncate_tile_under(Path(tiles.slide_path(bad)), patch.x + 10, patch.y + 10)
    large_image.cache_util.cachesClear()  # this process read the slide at ingest: forget its tiles

    started = time.monotonic()
    thread, out = run_round_in_thread(project)
    thread.join(timeout=50)
    assert not thread.is_alive(), "the round hung on the corrupt slide"
    round_ = TrainingRound.objects.get(pk=out["round"])
    assert round_.state == "failed", round_.metrics
    assert f"Slide '{bad.name}'" in round_.error and "corrupt or truncated" in round_.error, round_.error
    assert good.name not in round_.error
    print(f"failed in {time.monotonic() - started:.1f} s: {round_.error}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90, func_only=True)
def test_slides_are_embedded_in_the_background_after_ingest_and_a_round_does_only_what_is_left(
    shard_settings, settings: Any, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    a, b = shard_settings
    settings.LEARNER = {**settings.LEARNER, "BACKGROUND_EMBEDDING": True}
    before = worker_counts((a, b))
    project = ProjectFactory()
    crop = cmu_crop(tmp_path, "background.tiff", 1600, 800, 896, 896)
    slide = add_slide(project, crop)  # its ingest queues the background shards
    n = Patch.objects.filter(slide=slide).count()
    # A round started at once meets background shards in flight: it waits for them or takes pieces over.
    thread, out = run_round_in_thread(project)
    thread.join(timeout=60)
    round_ = TrainingRound.objects.get(pk=out["round"])
    assert round_.state == "succeeded", (round_.error, a.text()[-2000:], b.text()[-2000:])
    stats = round_.metrics["embedding"]

    def background_total() -> int:
        # This slide's shards only: a shard of an earlier test's round may still finish meanwhile.
        after = worker_counts((a, b), slide=crop.name)
        return sum(v for k, v in after.items() if k not in before)

    # Give shards that had finished embedding a moment to log; then every patch was embedded exactly once.
    time.sleep(1)
    # (The background may have finished before the round looked: then the round embedded nothing itself.)
    assert stats.get("by_round", 0) + background_total() == n, (stats, background_total())
    assert background_total() > 0
    assert len(store_positions(slide)) == n
    # The next round finds everything embedded and sends nothing.
    thread, out = run_round_in_thread(project)
    thread.join(timeout=30)
    again = TrainingRound.objects.get(pk=out["round"])
    assert again.state == "succeeded", again.error
    assert again.metrics["embedding"]["missing"] == 0 and "shards" not in again.metrics["embedding"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90, func_only=True)
def test_cancelling_a_round_stops_its_shards_from_being_scheduled(shard_settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    workers = shard_settings
    project = ProjectFactory()
    slide = add_slide(project, cmu_crop(tmp_path, "cancel.tiff", 1100, 820, 1120, 896))
    n = Patch.objects.filter(slide=slide).count()
    names = [w.name for w in workers]
    before = {w.name: len(w.embedded()) for w in workers}
    discarded = sum(w.text().count("Discarding revoked task") for w in workers)
    # The workers stop taking from the queue (they still hear control messages), so the shards wait there.
    app.control.cancel_consumer(QUEUE, destination=names, reply=True, timeout=5)
    # Cancel once the round has embedded its first shard itself: from inside the round, right after that shard,
    # so however fast the backend embeds, the rest are still on the queue.
    original = shards_module.embed_pieces

    def embed_then_cancel(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        running = TrainingRound.objects.filter(project=project, state="running").first()
        if running is not None and queued() > 0:
            services.cancel_round(running)
        return result

    monkeypatch.setattr(shards_module, "embed_pieces", embed_then_cancel)
    monkeypatch.setattr(reporter, "CANCEL_CHECK_INTERVAL", 0.0)  # the round looks at once, not within a second
    try:
        thread, out = run_round_in_thread(project)
        thread.join(timeout=60)
        round_ = TrainingRound.objects.get(pk=out["round"])
        assert round_.state == "cancelled", (round_.state, round_.error)
    finally:
        app.control.add_consumer(QUEUE, destination=names, reply=True, timeout=5)
    # Once consuming again, the workers discard the round's shards unstarted: nothing more is embedded.
    wait_for(lambda: queued() == 0, timeout=20, message="the workers to drain the queue")
    time.sleep(1)
    logs = "\n".join(w.text()[-1500:] for w in workers)
    assert sum(w.text().count("Discarding revoked task") for w in workers) > discarded, logs
    assert {w.name: len(w.embedded()) for w in workers} == before
    assert 0 < len(store_positions(slide)) < n


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120, func_only=True)
def test_a_shard_that_keeps_killing_its_worker_is_refused_after_its_third_start(settings: Any, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A shard's message comes back each time its worker dies holding it; past MAX_SHARD_STARTS it fails with
    the slide's name instead of going round for ever (a redelivery keeps the task id, which counts the starts)."""
    settings.LEARNER = {**settings.LEARNER, "CACHE_DIR": str(tmp_path / "cache"), "SHARD_PATCHES": SHARD_PATCHES}
    project = ProjectFactory()
    slide = add_slide(project, cmu_crop(tmp_path, f"poison-{uuid.uuid4().hex[:6]}.tiff", 2048, 1024, 448, 448))
    cfg = learner_settings()
    backbone = embedding.platform_backbone(project.backbone, cfg)
    store = embedding.store_for(backbone, project.patch_size, cfg)
    ids, xy = [], []
    for pk, x, y in Patch.objects.filter(slide=slide).values_list("id", "x", "y"):
        ids.append(pk)
        xy.append((x, y))
    key = embedding.slide_key(slide.checksum, slide.pk, project.patch_size, project.patch_size)
    pieces = shards_module.split(key, slide.pk, project.patch_size, np.array(ids), np.array(xy), SHARD_PATCHES)
    payload = shards_module.shard_payload(
        pieces[:1], project.backbone, store.model_id, project.patch_size, SHARD_PATCHES
    )
    task_id = f"poison-{uuid.uuid4()}"
    first = shards_module.run_shard(payload, worker="w", task_id=task_id)
    assert first["embedded"] == len(pieces[0].idx) > 0
    for _ in range(shards_module.MAX_SHARD_STARTS - 1):  # redeliveries after a death: allowed, and no-ops now
        assert shards_module.run_shard(payload, worker="w", task_id=task_id)["embedded"] == 0
    with pytest.raises(shards_module.ShardFailed, match=rf"'{slide.name}' was started 3 times and the worker"):
        shards_module.run_shard(payload, worker="w", task_id=task_id)
    # another message of the same pieces (a later round's) is its own count
    assert shards_module.run_shard(payload, worker="w", task_id=f"other-{uuid.uuid4()}")["embedded"] == 0
