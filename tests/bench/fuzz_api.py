"""A larger Schemathesis run over the REST API than the suite's fuzz test, against the live ASGI
server, as each role: requests sent, operations covered, 5xx answers, schema mismatches, time.

    .venv/bin/python tests/bench/fuzz_api.py [--examples 100] [--roles crowd,expert,admin] [--seed N]

Uses DATABASE_URL/REDIS_URL like manage.py (embedded services when unset), in a throw-away
database created for the run and dropped at the end, with a throw-away MEDIA_ROOT. Each role
gets its own seeded project (tests/fuzzing.py says what it holds and how requests are steered).
``--examples`` positive and as many negative requests are generated per operation and role
(fewer where an operation has fewer distinct requests). Every distinct failure is listed with
the smallest request that showed it; ``--quiet`` prints only the figures. Exits 1 when any
request got a 5xx or an answer off the schema.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="positive (and as many negative) per operation")
    parser.add_argument("--roles", default="crowd,expert,admin", help="comma-separated, in the order run")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: the suite's)")
    parser.add_argument("--slide", default=str(REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"))
    parser.add_argument("--quiet", action="store_true", help="print the figures only, not each failure")
    args = parser.parse_args()
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]

    embedded.ensure_environment()
    media = Path(tempfile.mkdtemp(prefix="histoloop-bench-fuzz-"))
    os.environ["MEDIA_ROOT"] = str(media)
    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("FAST_PASSWORD_HASHING", "1")
    # A database of the run's own: the admin's requests create projects and members at will.
    os.environ["TEST_DATABASE_NAME"] = f"bench_fuzz_{os.getpid()}"
    import django

    django.setup()
    from django.conf import settings
    from django.db import connections
    from django.test.utils import setup_databases, teardown_databases

    from tests import fuzzing
    from tests.servers import asgi_server, purge_task_queues, server_env

    unknown = sorted(set(roles) - set(fuzzing.ROLES))
    if unknown:
        parser.error(f"unknown role(s) {', '.join(unknown)}: use {', '.join(fuzzing.ROLES)}")
    database = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    url = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path="/" + settings.DATABASES["default"]["NAME"]))
    log = media / "server.log"
    reports = []
    started = time.monotonic()
    try:
        with asgi_server(server_env(url), log) as port:
            base = f"http://127.0.0.1:{port}"
            schema = fuzzing.load_schema(base)
            total = sum(1 for _ in schema.get_all_operations())
            print(f"{total} operations in the schema; {args.examples} examples per operation, mode and role\n")
            for role in roles:
                target = fuzzing.seed_project(role, Path(args.slide))
                connections.close_all()
                report = fuzzing.fuzz_role(
                    schema,
                    base,
                    target,
                    examples=args.examples,
                    seed_value=args.seed if args.seed is not None else fuzzing.SEED,
                )
                purge_task_queues()
                reports.append(report)
                print(f"{role}: {report.requests} requests in {report.seconds:.0f} s", flush=True)
    finally:
        connections.close_all()
        teardown_databases(database, verbosity=0)
        shutil.rmtree(media, ignore_errors=True)
    if not args.quiet:
        for report in reports:
            print()
            print(fuzzing.failure_report(report) if report.problems() else f"{report.role}: no problems found")
    print()
    print(fuzzing.summary_table(reports, total))
    print(f"\n{sum(r.requests for r in reports)} requests in {time.monotonic() - started:.0f} s")
    return 1 if any(r.problems() for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
