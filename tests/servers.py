"""Real processes for tests and benchmarks: an ASGI server (the same command the demo and the Docker
image serve with, ``histoloop.serve``) and Celery workers (the same ``celery worker`` the compose files run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histoloop.embedded import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def server_env(database_url: str) -> dict[str, str]:
    """The environment for a server process that must share this process's database, media,
    learner folders and channel layer (call after Django's settings are loaded)."""
    from django.conf import settings

    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env["MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env["LEARNER_CACHE_DIR"] = settings.LEARNER["CACHE_DIR"]
    env["LEARNER_WEIGHTS_DIR"] = settings.LEARNER["WEIGHTS_DIR"]
    env["DEBUG"] = "1"
    # Hash passwords exactly as this process does, or users made here cannot log in there.
    # (pytest-django loads settings before tests/conftest.py sets FAST_PASSWORD_HASHING.)
    env["FAST_PASSWORD_HASHING"] = "1" if "MD5" in settings.PASSWORD_HASHERS[0] else "0"
    env.pop("TEST_DATABASE_NAME", None)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


@contextmanager
def asgi_server(env: dict[str, str], log: Path, *, workers: int = 1, timeout: float = 180) -> Iterator[int]:
    """histoloop.asgi served by ``workers`` processes on a free loopback port; yields the port
    once it accepts connections. ``timeout`` is generous: on a loaded 2-core machine importing the
    application (torch included) in each process can take a minute."""
    port = free_port()
    started_before = log.read_text(errors="replace").count("Started server process") if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "histoloop.serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the ASGI server exited early:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the ASGI server did not start listening:\n{log.read_text()}") from None
                time.sleep(0.1)
        # With several workers the supervisor listens before they have loaded the application (histoloop.asgi
        # loads every view, torch included): wait until each says it started, or the first requests wait.
        while log.read_text(errors="replace").count("Started server process") - started_before < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the ASGI server's workers did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_celery_worker(
    env: dict[str, str], log: Path, *, queues: str, name: str, pool: str = "solo"
) -> subprocess.Popen[bytes]:
    """Start one ``celery -A histoloop worker`` (concurrency 1) on ``queues``, logging to ``log``; it is not
    ready yet: see :func:`wait_until_ready` (start several first, then wait, so they import torch at once)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "histoloop", "worker", "-Q", queues, "--pool", pool,
             "--concurrency", "1", "-l", "info", "--without-gossip", "--without-mingle", "-n", name],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_until_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Wait for the worker's "ready." line; kill it and raise with its log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while "ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            why = "exited early" if proc.poll() is not None else f"was not ready after {timeout:.0f} s"
            raise RuntimeError(f"The Celery worker {why}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (a worker's warm shutdown), then SIGKILL if it has not ended within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def celery_worker(
    env: dict[str, str], log: Path, *, queues: str = "gpu,cpu", name: str = "", pool: str = "solo", timeout: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """A ready Celery worker for the block, stopped after it."""
    proc = start_celery_worker(env, log, queues=queues, name=name or f"test-{os.getpid()}@%h", pool=pool)
    try:
        wait_until_ready(proc, log, timeout)
        yield proc
    finally:
        stop_process(proc)


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids of the processes in process group ``pgid`` that are running (zombies left out)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def purge_task_queues() -> int:
    """Drop the Celery messages waiting on the broker's gpu and cpu queues; returns how many there were.

    A test that is not meant to have a worker (the fuzzer's rounds and ingests, the tasks of tests whose
    data was rolled back, a run stopped half-way on the same broker) leaves its messages there, and a
    worker started later would run them against another test's data."""
    from histoloop.celery import app

    purged = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue_name in ("gpu", "cpu"):
            try:
                purged += channel.queue_purge(queue_name) or 0
            except Exception:  # noqa: S112 - a queue that was never declared has nothing to purge
                continue
    return purged
