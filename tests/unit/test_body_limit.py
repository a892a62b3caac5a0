"""histoloop.body_limit with a fake ASGI app, receive and send: refusals happen before the body is read."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from histoloop.body_limit import RequestBodyLimit, UploadRoute

SMALL = 1000
LARGE = 100_000
UPLOAD = UploadRoute("POST", re.compile(r"/api/v1/projects/[0-9]+/slides/"), LARGE, "slide uploads")


class FakeClient:
    """Feeds body chunks to receive() and counts how many were taken."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.taken = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.taken >= len(self.chunks):
            await asyncio.sleep(3600)  # a client that keeps the connection open without sending
        chunk = self.chunks[self.taken]
        self.taken += 1
        return {"type": "http.request", "body": chunk, "more_body": self.taken < len(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def detail(self) -> str:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return json.loads(body)["detail"]


class ReadingApp:
    """Like Django's ASGI handler: reads the whole body, then answers 200 with its length."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""
        self.aborted = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.aborted = True
                return
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(self.body)).encode()})


def http_scope(path: str = "/api/v1/projects/1/votes/", method: str = "POST", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def run(
    scope: dict[str, Any], chunks: list[bytes], *, authenticated: bool = False
) -> tuple[ReadingApp, FakeClient, list[dict[str, Any]]]:
    app, client = ReadingApp(), FakeClient(chunks)
    looked_up: list[dict[str, Any]] = []

    async def authenticate(scope: dict[str, Any]) -> bool:
        looked_up.append(scope)
        return authenticated

    middleware = RequestBodyLimit(app, max_bytes=SMALL, upload_routes=[UPLOAD], authenticate=authenticate)
    asyncio.run(asyncio.wait_for(middleware(scope, client.receive, client.send), timeout=5))
    return app, client, looked_up


def test_an_announced_length_over_the_limit_is_refused_without_reading_a_byte() -> None:
    app, client, _ = run(http_scope(content_length=str(10**12)), [b"x" * 100] * 5)
    assert client.status == 413
    assert "larger than the 1000 bytes this address accepts" in client.detail
    assert client.taken == 0
    assert not app.called
    assert (b"connection", b"close") in client.sent[0]["headers"]


def test_a_body_within_the_limit_reaches_the_app_whole() -> None:
    app, client, looked_up = run(http_scope(content_length="600"), [b"x" * 300, b"y" * 300])
    assert client.status == 200
    assert app.body == b"x" * 300 + b"y" * 300
    assert looked_up == []  # no database lookup for an ordinary request


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit() -> None:
    app, client, _ = run(http_scope(transfer_encoding="chunked"), [b"x" * 400] * 50)
    assert client.status == 413
    assert client.taken == 3  # 1200 bytes: the third chunk passed the limit, nothing more was read
    assert app.aborted  # the app was told the client left, so it drops what it buffered
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]


def test_an_authenticated_upload_may_send_up_to_the_upload_limit() -> None:
    app, client, looked_up = run(
        http_scope("/api/v1/projects/7/slides/", content_length=str(50_000)), [b"x" * 50_000], authenticated=True
    )
    assert client.status == 200
    assert len(app.body) == 50_000
    assert len(looked_up) == 1


def test_an_anonymous_upload_over_the_small_limit_is_refused_early_and_told_to_log_in() -> None:
    app, client, _ = run(http_scope("/api/v1/projects/7/slides/", content_length=str(50_000)), [b"x" * 50_000])
    assert client.status == 413
    assert "accepted only from a logged-in user" in client.detail
    assert client.taken == 0 and not app.called


def test_an_anonymous_chunked_upload_gets_the_small_limit() -> None:
    app, client, _ = run(http_scope("/api/v1/projects/7/slides/", transfer_encoding="chunked"), [b"x" * 600] * 10)
    assert client.status == 413
    assert client.taken == 2 and app.aborted
    assert "log in" in client.detail


def test_even_an_authenticated_upload_is_refused_over_the_upload_limit() -> None:
    app, client, _ = run(
        http_scope("/api/v1/projects/7/slides/", content_length=str(LARGE + 1)), [b"x"], authenticated=True
    )
    assert client.status == 413
    assert "limit for slide uploads" in client.detail
    assert client.taken == 0 and not app.called


@pytest.mark.parametrize(
    ("path", "method"),
    [("/api/v1/projects/7/slides/", "PUT"), ("/api/v1/projects/7/slides/x/", "POST"), ("/api/v1/slides/7/", "POST")],
)
def test_only_the_upload_routes_get_the_upload_limit(path: str, method: str) -> None:
    app, client, looked_up = run(http_scope(path, method, content_length=str(50_000)), [b"x"], authenticated=True)
    assert client.status == 413
    assert looked_up == [] and not app.called


def test_a_content_length_that_is_not_a_number_is_refused() -> None:
    app, client, _ = run(http_scope(content_length="-5"), [b"x"])
    assert client.status == 400
    assert "Content-Length" in client.detail
    assert not app.called


def test_websockets_pass_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = RequestBodyLimit(app, max_bytes=SMALL)
    client = FakeClient([])
    asyncio.run(middleware({"type": "websocket", "path": "/ws/projects/1/"}, client.receive, client.send))
    assert seen == ["websocket"]
