"""The one-hop ASGI handler (histoloop.asgi_handler) answers as Django's stock ASGI handler does.

Both are driven as the ASGI server drives them, request by request, on the same data: the status,
the body and the headers (security headers and the Content-Security-Policy included, the nonce aside)
must be the same, for the annotator's hot path and for the refusals around it. Django runs each
request's database work in a thread of its own, which cannot see a test's uncommitted transaction;
so these tests commit (``transactional_db``).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.asgi import get_asgi_application
from rest_framework.authtoken.models import Token

from annotations import member_cache
from annotations.models import Role, Vote
from histoloop.asgi_handler import OneHopASGIHandler, get_application
from tests.asgi_client import asgi_request, session_cookie
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member, queue_every_patch

pytestmark = pytest.mark.django_db(transaction=True)


def call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> dict[str, Any]:
    length = [(b"content-length", str(len(body)).encode())]
    status, sent, content = asgi_request(app, method, path, [*length, *headers], body)
    names = {name.decode().lower(): value.decode("latin-1") for name, value in sent}
    return {"status": status, "headers": names, "body": content}


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """What must match between the handlers: per-request values (nonce, CSRF token, ids, times) masked."""
    headers = dict(response["headers"])
    if "content-security-policy" in headers:
        headers["content-security-policy"] = re.sub(r"'nonce-[^']+'", "'nonce-*'", headers["content-security-policy"])
    headers.pop("set-cookie", None)
    if "expires" in headers:  # the time of the response (a page's never-cache): it may turn a second between the two
        headers["expires"] = "*"
    return {"status": response["status"], "headers": headers}


@pytest.fixture
def world():  # type: ignore[no-untyped-def]
    member_cache.entries.clear()
    project = ProjectFactory(votes_required=3, gold_rate=0.0)
    slide = SlideFactory(project=project, name="case-1.svs")
    PatchFactory.create_batch(8, slide=slide)
    queue_every_patch(project)
    yield project
    member_cache.entries.clear()


def token_headers(user: Any) -> list[tuple[bytes, bytes]]:
    key = Token.objects.get_or_create(user=user)[0].key
    return [(b"authorization", f"Token {key}".encode()), (b"content-type", b"application/json")]


def session_headers(user: Any, csrf: bool) -> list[tuple[bytes, bytes]]:
    cookie = session_cookie(user)
    headers = [(b"content-type", b"application/json")]
    if csrf:
        secret = "a" * 32
        cookie += f"; {settings.CSRF_COOKIE_NAME}={secret}"
        headers.append((b"x-csrftoken", secret.encode()))
    return [(b"cookie", cookie.encode()), *headers]


def test_the_hot_path_and_its_refusals_answer_the_same_through_both_handlers(world) -> None:  # type: ignore[no-untyped-def]
    stock, one_hop = get_asgi_application(), OneHopASGIHandler()
    base = f"/api/v1/projects/{world.pk}"
    crowd, outsider = member(world, Role.CROWD), member(ProjectFactory(), Role.CROWD)
    for app in (stock, one_hop):
        user = member(world, Role.CROWD)
        auth = token_headers(user)
        leased = call(app, "POST", f"{base}/next-task/", auth)
        assert leased["status"] == 200, leased
        task = json.loads(leased["body"])
        body = json.dumps({"patch": task["patch"]["id"], "task": task["id"], "label": "benign"}).encode()
        voted = call(app, "POST", f"{base}/votes/", auth, body)
        assert voted["status"] == 201, voted
        assert json.loads(voted["body"])["vote"]["label_name"] == "benign"
        again = call(app, "POST", f"{base}/votes/", auth, body)  # a second vote on the same patch
        assert Vote.objects.filter(annotator=user).count() == 1
        app.answers = [comparable(leased), comparable(voted), again]  # type: ignore[attr-defined]
    assert stock.answers[:2] == one_hop.answers[:2]  # type: ignore[attr-defined]
    assert stock.answers[2]["status"] == one_hop.answers[2]["status"] == 409  # type: ignore[attr-defined]
    assert stock.answers[2]["body"] == one_hop.answers[2]["body"]  # type: ignore[attr-defined]

    # Refusals: each the same status, body and headers from both handlers.
    requests = [
        ("POST", f"{base}/next-task/", [], b""),  # anonymous
        ("POST", f"{base}/next-task/", token_headers(outsider), b""),  # someone else's project
        ("POST", f"{base}/votes/", token_headers(crowd), b'{"patch": "x", "label": ""}'),  # malformed
        ("POST", f"{base}/votes/", token_headers(crowd), b"{not json"),
        ("POST", f"{base}/next-task/", session_headers(crowd, csrf=False), b""),  # session without CSRF
        ("POST", f"{base}/next-task/", [(b"authorization", b"Token nope")], b""),
        ("GET", "/api/v1/no-such-thing/", [], b""),
        ("GET", "/accounts/login/", [], b""),  # a page: the policy with its nonce
    ]
    for method, path, headers, body in requests:
        a, b = call(stock, method, path, headers, body), call(one_hop, method, path, headers, body)
        assert comparable(a) == comparable(b), (path, a, b)
        if "json" in a["headers"].get("content-type", ""):
            assert a["body"] == b["body"], (path, a["body"], b["body"])
        assert a["status"] >= 400 or path.startswith("/accounts/"), (path, a)
    # A session with its CSRF token is let through by both.
    for app in (stock, one_hop):
        assert call(app, "POST", f"{base}/next-task/", session_headers(crowd, csrf=True))["status"] == 200


def test_the_chain_is_synchronous_and_runs_in_the_handlers_threads(world) -> None:  # type: ignore[no-untyped-def]
    handler = OneHopASGIHandler(threads=2)
    assert not iscoroutinefunction(handler._middleware_chain)  # Django's WSGI-style chain, not the async one
    seen: list[str] = []

    def record(**_: Any) -> None:
        seen.append(threading.current_thread().name)

    from django.core.signals import request_finished, request_started

    request_started.connect(record)
    request_finished.connect(record)
    try:
        response = call(handler, "POST", f"/api/v1/projects/{world.pk}/next-task/", token_headers(member(world)))
    finally:
        request_started.disconnect(record)
        request_finished.disconnect(record)
    assert response["status"] == 200
    # Started and finished in one hop, in one of the handler's threads: the connection went back there.
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0].startswith("django-http"), seen
    # The next request reuses that thread (kept idle) instead of starting one.
    call(handler, "POST", f"/api/v1/projects/{world.pk}/next-task/", token_headers(member(world)))
    assert len(handler._idle) == 1


def test_the_served_application_uses_it_unless_turned_off(settings) -> None:  # type: ignore[no-untyped-def]
    settings.ONE_HOP_ASGI = True
    assert isinstance(get_application(), OneHopASGIHandler)
    settings.ONE_HOP_ASGI = False
    app = get_application()
    assert not isinstance(app, OneHopASGIHandler)
