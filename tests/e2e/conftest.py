"""Browser tests: Debian's Chromium driven by Playwright against the real ASGI server
(histoloop.serve with 2 worker processes).

The server runs as a subprocess on the test database, so everything a test sets up is committed
(``committed`` below) rather than wrapped in a rolled-back transaction. Each test makes its own
project, so tests never see each other's votes. Any console error or page error fails the test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.urls import Resolver404, resolve

from tests.conftest import SLIDES_DIR
from tests.integration.conftest import REPO_ROOT, celery_worker_process, test_database_url  # noqa: F401

# Playwright's sync API keeps an event loop in this thread; the ORM calls the tests make between
# browser steps are plain synchronous code (see stack.md), so let Django allow them.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

from tests import servers
from tests.e2e.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.servers import asgi_server

ARTIFACTS = REPO_ROOT / "test-artifacts"
SLIDE_FILE = SLIDES_DIR / "cmu-1-small-region.svs"
PASSWORD = "pw-histoloop-1"  # tests.factories.UserFactory's password

pytestmark = pytest.mark.e2e


def server_env() -> dict[str, str]:
    """The environment for processes that must share the test database, media and channel layer."""
    return servers.server_env(test_database_url())


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment: None, django_db_blocker: Any) -> Iterator[None]:
    """The test database, always: these tests use no ``db`` fixture (their data must be committed,
    and a flush between tests would throw away the ingested slide), so pytest-django's own
    ``django_db_setup`` would decide no database is needed."""
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=0)


@pytest.fixture(scope="session")
def server_url(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two uvicorn worker processes serving histoloop.asgi (HTTP and websockets) on a free loopback port."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "server.log"
    log.write_bytes(b"")
    with asgi_server(server_env(), log, workers=2) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def committed(django_db_setup: None, django_db_blocker: Any) -> Callable[[], AbstractContextManager[None]]:
    """``with committed():`` runs ORM code in autocommit, visible to the server at once.

    The connection is closed afterwards: Playwright's event loop gives fixtures and tests
    different connection objects, and one left open would block dropping the test database.
    """
    from django.db import connections

    @contextmanager
    def block() -> Iterator[None]:
        with django_db_blocker.unblock():
            try:
                yield
            finally:
                connections.close_all()

    return block


@pytest.fixture(scope="session")
def template_slide(committed: Callable[[], AbstractContextManager[None]]) -> Any:
    """cmu-1-small-region.svs ingested once through the real slide service (metadata, tissue, grid)."""
    from annotations.slides import ingest
    from tests.factories import ProjectFactory

    with committed():
        project = ProjectFactory(name="e2e slide template")
        slide = ingest.add_slide_from_path(project, SLIDE_FILE, launch=False)
        slide = ingest.ingest(slide.pk)
        assert slide is not None and slide.status == "ready", slide and slide.error
        assert slide.patches.exists(), "the test slide produced no patches"
    return slide


@dataclass
class Seeded:
    project: Any
    slide: Any
    patches: list[Any] = field(default_factory=list)


@pytest.fixture
def make_project(committed: Callable[[], AbstractContextManager[None]], template_slide: Any) -> Callable[..., Seeded]:
    """A fresh project with a copy of the ingested slide (same file, same patch grid)."""
    from annotations.models import Patch, Slide
    from tests.factories import ProjectFactory, copy_slide

    def make(*, queue: bool = True, **project_fields: Any) -> Seeded:
        with committed():
            project = ProjectFactory(**project_fields)
            slide = copy_slide(template_slide, project, status=Slide.Status.READY)
            Patch.objects.bulk_create(
                Patch(
                    project=project,
                    slide=slide,
                    x=p.x,
                    y=p.y,
                    size=p.size,
                    magnification=p.magnification,
                    tissue_fraction=p.tissue_fraction,
                )
                for p in template_slide.patches.order_by("id")
            )
            if queue:
                from tests.factories import queue_every_patch

                queue_every_patch(project)
            patches = list(slide.patches.order_by("id"))
        return Seeded(project=project, slide=slide, patches=patches)

    return make


@pytest.fixture
def make_member(committed: Callable[[], AbstractContextManager[None]]) -> Callable[..., Any]:
    from annotations.models import Membership
    from tests.factories import UserFactory

    def make(project: Any, role: str, username: str | None = None, **user_fields: Any) -> Any:
        with committed():
            user = UserFactory(**({"username": username} if username else {}), **user_fields)
            Membership.objects.create(user=user, project=project, role=role)
        return user

    return make


def url_exists(path: str) -> bool:
    try:
        resolve(path)
    except Resolver404:
        return False
    return True


def send_event(project_id: int, payload: dict[str, Any]) -> None:
    """Push an event to the project's websocket group, as a service would after commit.

    Done in a thread: Playwright's event loop in this thread rules out async_to_sync here.
    """
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from annotations.consumers import project_group

    def send() -> None:
        async_to_sync(get_channel_layer().group_send)(
            project_group(project_id), {"type": "project.event", "payload": payload}
        )

    thread = threading.Thread(target=send)
    thread.start()
    thread.join(timeout=10)


# --- the browser ---


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    """Debian's Chromium with the flags these machines need; never a downloaded browser build."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: run `make chromium` (apt-get install chromium).")
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(server_url: str) -> dict[str, Any]:
    return {"base_url": server_url, "viewport": {"width": 1366, "height": 768}}


@dataclass
class BrowserProblems:
    errors: list[str] = field(default_factory=list)
    allowed: list[Callable[[str, str], bool]] = field(default_factory=list)

    def allow(self, predicate: Callable[[str, str], bool]) -> None:
        """Tolerate console errors matching ``predicate(text, url)`` (for endpoints not yet there)."""
        self.allowed.append(predicate)


@pytest.fixture
def page(context: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page that records console errors and uncaught exceptions; the test fails on any."""
    problems = BrowserProblems()
    page = context.new_page()
    page.set_default_timeout(15_000)

    def on_console(message: Any) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        if any(allowed(message.text, url) for allowed in problems.allowed):
            return
        problems.errors.append(f"console error: {message.text} ({url})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.errors.append(f"page error: {error}"))
    page.problems = problems
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"), full_page=True)
    except Exception:  # noqa: S110 - a screenshot is a nicety; the assertions below matter
        pass
    page.close()
    assert not problems.errors, "The browser reported errors:\n" + "\n".join(problems.errors)


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(page: Any, username: str, password: str = PASSWORD, *, next_path: str = "/") -> None:
    page.goto(f"/accounts/login/?next={next_path}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
