"""`make demo`: the whole platform on one machine.

Starts (or reuses) the database and broker (embedded unless DATABASE_URL/REDIS_URL are set),
migrates, seeds a demo project with real slides, then runs a Celery worker for the ``gpu`` and
``cpu`` queues (with beat, for the periodic checks) and the ASGI server on http://127.0.0.1:8000 until Ctrl+C.

The demo runs as production does, with DEBUG off (no tracebacks for whoever triggers an error;
``DEBUG=1 make demo`` for them), except that it is served over plain http on loopback (HTTPS=0):
its secret key is made once and kept in ``var/secret-key``, and static files are collected into
STATIC_ROOT for WhiteNoise before the server starts.

The worker and the web server run under histoloop.supervisor: one that dies (``kill -9``
included) is started again within seconds, with a message, while the other keeps running.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from histoloop import embedded
from histoloop.supervisor import Child, Supervisor

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY_FILE = REPO_ROOT / "var" / "secret-key"


def _manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, check=True)


def secret_key(path: Path = SECRET_KEY_FILE) -> str:
    """The demo's secret key: made on first use, then the same on every start (sessions survive)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def demo_environment() -> None:
    """Production settings (DEBUG off unless asked for) served over plain http on this machine."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    os.environ.setdefault("HTTPS", "0")
    if not os.environ.get("SECRET_KEY"):
        os.environ["SECRET_KEY"] = secret_key()


def worker_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "histoloop",
        "worker",
        "-Q",
        "gpu,cpu",
        "--concurrency",
        "2",
        "-l",
        "info",
        "-n",
        "demo@%h",
        # Celery beat inside the demo's one worker: the periodic stale-round check.
        "--beat",
        "--schedule",
        str(REPO_ROOT / "var" / "celerybeat-schedule"),
    ]


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill PID` stops the demo as Ctrl+C does: children and servers too


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole platform on this machine (make demo).")
    parser.add_argument("--no-seed", action="store_true", help="Do not create the demo project and users.")
    args = parser.parse_args(argv)
    # SIGINT too: a shell without job control starts background commands with it ignored.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    demo_environment()
    started = embedded.ensure_environment()
    host = os.environ.get("HISTOLOOP_HOST", "127.0.0.1")
    port = os.environ.get("HISTOLOOP_PORT", "8000")
    print(f"Database: {os.environ['DATABASE_URL']}\nBroker:   {os.environ['REDIS_URL']}", flush=True)
    supervisor = Supervisor(
        [
            # A dead worker is started again and the pages keep being served (rounds and ingest
            # wait for it); a web server that keeps dying ends the demo.
            Child("the Celery worker", worker_command(), essential=False),
            Child("the web server", [sys.executable, "-m", "histoloop.serve", "--host", host, "--port", port]),
        ],
        cwd=REPO_ROOT,
    )
    try:
        _manage("migrate", "--noinput", "-v", "0")
        _manage("collectstatic", "--noinput", "-v", "0")  # WhiteNoise serves STATIC_ROOT when DEBUG is off
        supervisor.start_all()
        for child in supervisor.children:
            assert child.process is not None
            print(f"histoloop: started {child.name} (pid {child.process.pid}).", flush=True)
        if not args.no_seed:
            # Seeding queues slide ingest on the worker just started, so the demo shows real progress.
            _manage("seed_demo")
        print(f"\nHistoloop is running at http://{host}:{port}/  (Ctrl+C to stop)\n", flush=True)
        return supervisor.run()
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl+C must not cut the clean-up short
        supervisor.stop_all()
        if started:
            embedded.stop(started)


if __name__ == "__main__":
    sys.exit(main())
