"""Schemathesis against the live ASGI server: nothing a member of any role sends may crash the
server (5xx) or be answered other than the OpenAPI schema says (status code, content type,
headers, body).

The server is the real one (``histoloop.serve``, as the demo and the Docker image run it) on the
test database, so the whole stack is under test: uvicorn, the middleware, DRF's parsers and
authentication. It runs with DEBUG=1 only so that a 500's exception can be read from the debug
page and named in the failure. See tests/fuzzing.py for how requests are generated and steered;
tests/bench/fuzz_api.py runs the same with many more examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from tests import fuzzing
from tests.conftest import SLIDES_DIR
from tests.integration import conftest as integration
from tests.servers import asgi_server, purge_task_queues, server_env

# Per operation and role, at most this many positive and as many negative requests, besides the
# dictionary pass (3 roles x 37 operations: about 3,000 requests, two minutes on a 2-core machine).
EXAMPLES = 10
SLIDE = SLIDES_DIR / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def fuzz_media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A MEDIA_ROOT of the module's own, shared with the server: slides the fuzzer uploads or
    the seeding ingests never land beside other tests' files."""
    root = tmp_path_factory.mktemp("fuzz-media")
    with override_settings(MEDIA_ROOT=root):
        yield root


@pytest.fixture(scope="module")
def fuzz_server(django_db_setup: None, fuzz_media: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    with asgi_server(server_env(integration.test_database_url()), log) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> Any:
    return fuzzing.load_schema(fuzz_server)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a stalled server fails the test with a traceback instead of holding CI
@pytest.mark.parametrize("role", fuzzing.ROLES)
def test_no_request_from_a_member_crashes_the_server_or_strays_from_the_schema(
    role: str, django_db_reset_sequences: None, fuzz_server: str, api_schema: Any
) -> None:
    # Committed rows (the server is another process), with ids from 1 whatever ran before, so the
    # rows the requests reach do not depend on earlier tests.
    target = fuzzing.seed_project(role, SLIDE)
    try:
        report = fuzzing.fuzz_role(api_schema, fuzz_server, target, examples=EXAMPLES)
    finally:
        purge_task_queues()
    operations = {result.ok().label for result in api_schema.get_all_operations()}
    # A fuzzer that sent nothing proves nothing: every operation must have been exercised.
    assert report.operations == operations, f"operations never requested: {sorted(operations - report.operations)}"
    if report.problems():
        pytest.fail(fuzzing.failure_report(report), pytrace=False)
