"""Serve histoloop.asgi (HTTP and websockets) with several uvicorn worker processes.

    python -m histoloop.serve [--host 127.0.0.1] [--port 8000] [--workers N]

Why several processes: each process runs Django's synchronous middleware and views in a pool of
``HTTP_THREADS`` threads (histoloop.asgi_handler), and Python runs one thread's bytecode at a time,
so one process uses about one core. Worker processes share the listening socket; websockets work
from any of them because Channels groups live in Redis.
``--workers`` defaults to ``WEB_CONCURRENCY``, else the number of CPU cores (at most 8).
"""

from __future__ import annotations

import argparse
import os


def default_workers() -> int:
    if os.environ.get("WEB_CONCURRENCY"):
        return max(1, int(os.environ["WEB_CONCURRENCY"]))
    return max(1, min(8, os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--no-access-log", action="store_true", help="Do not log one line per request.")
    args = parser.parse_args(argv)

    import uvicorn

    from histoloop import embedded

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")
    embedded.ensure_environment()  # once here, so every worker inherits the same servers
    uvicorn.run(
        "histoloop.asgi:application",
        host=args.host,
        port=args.port,
        workers=args.workers,
        lifespan="off",  # Channels' router has no lifespan handler
        ws="websockets-sansio",
        access_log=not args.no_access_log,
        timeout_keep_alive=75,  # browsers keep idle connections open between clicks (nginx's default)
        timeout_graceful_shutdown=10,
        # The supervisor kills a child that does not answer its ping within this many seconds; a child
        # importing the views (torch included) on a loaded machine can take longer than uvicorn's 5 s,
        # and was then killed and restarted over and over without ever serving.
        timeout_worker_healthcheck=60,
    )


if __name__ == "__main__":
    main()
