"""Driving an ASGI application as the server does, one HTTP request at a time, for the integration tests of
what sits in front of Django (histoloop.asgi_handler, annotations.slides.lean)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.test import Client

Headers = list[tuple[bytes, bytes]]


def asgi_request(
    app: Any, method: str, path: str, headers: Headers, body: bytes = b"", host: bytes = b"testserver"
) -> tuple[int, Headers, bytes]:
    """Send one request (``host`` first, then ``headers``) and read the whole response: its status, its
    headers as sent and its body. Returns once the application has finished (for Django, once it closed the
    response, so request_finished gave the connection back). A ``?query`` in ``path`` becomes the query string."""
    path, _, query = path.partition("?")

    async def run() -> tuple[int, Headers, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", host), *headers],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        communicator = ApplicationCommunicator(app, scope)
        await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
        start = await communicator.receive_output(30)
        content = b""
        while True:
            message = await communicator.receive_output(30)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await communicator.wait(30)
        return start["status"], list(start["headers"]), content

    return async_to_sync(run)()


def session_cookie(user: Any) -> str:
    """``name=value`` of a logged-in session cookie for ``user``."""
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
