"""Request body limits, enforced in front of Django.

Django's ASGI handler reads the whole request body into a temporary file (spooled to disk past
``FILE_UPLOAD_MAX_MEMORY_SIZE``) before any middleware or view runs, so a limit checked in Django
comes too late: a client announcing ``Content-Length: 10**12`` would have the server writing to
/tmp for as long as it keeps sending. This ASGI middleware sits outside Django and

- answers 413 at once, without reading the body, when the announced ``Content-Length`` is over
  the route's limit;
- counts the bytes of a body sent without ``Content-Length`` (chunked) as they arrive and answers
  413 as soon as they pass the limit, telling Django the client went away;
- gives every route ``MAX_REQUEST_BYTES`` (a few MB, kept in memory by Django), and the upload
  routes (slide upload over REST and the upload page: ``MAX_UPLOAD_BYTES``; label import:
  ``MAX_IMPORT_BYTES``) their large limit only for an authenticated request: a valid session
  cookie or ``Authorization: Token``. An anonymous request there gets the small limit, so only
  a logged-in user can make the server spool a body to disk. Policy: an anonymous body over the
  small limit on an upload route gets 413 (the refusal is about the body's size; the sentence
  says to log in), a small one goes on to the view, which answers 403 as usual.

Authorisation (may this user upload to this project?) stays with the views.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from histoloop.units import human_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Authenticator = Callable[[Scope], Awaitable[bool]]

# Multipart framing and small form fields on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class UploadRoute:
    """Requests with ``method`` whose path matches ``pattern`` may send up to ``limit`` bytes when authenticated."""

    method: str
    pattern: re.Pattern[str]
    limit: int
    what: str  # for the 413 sentence: "slide uploads", "label imports"


class BodyTooLarge(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class RequestBodyLimit:
    """ASGI middleware for HTTP: see the module docstring. Websockets are not wrapped."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        upload_routes: Sequence[UploadRoute] = (),
        authenticate: Authenticator | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_routes = tuple(upload_routes)
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_length = header(scope, b"content-length")
        try:
            announced = int(raw_length) if raw_length is not None else None
        except ValueError:
            announced = -1
        if announced is not None and announced < 0:
            await respond(send, 400, "The Content-Length header is not a number of bytes; send a valid one.")
            return

        limit, detail = await self._limit(scope, announced)
        if announced is not None and announced > limit:
            await respond(send, 413, detail)
            return

        state = {"received": 0, "refused": False, "responded": False}

        async def limited_receive() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    # Stop reading: answer now, and tell the app the client left so it drops the body.
                    state["refused"] = True
                    if not state["responded"]:
                        state["responded"] = True
                        await respond(send, 413, detail)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # our 413 went out already
            if message["type"] == "http.response.start":
                state["responded"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _limit(self, scope: Scope, announced: int | None) -> tuple[int, str]:
        """The route's limit and the sentence for a body over it."""
        small = (
            f"The request body is larger than the {human_bytes(self.max_bytes)} this address accepts; "
            "nothing was read. Send a smaller request."
        )
        route = self._upload_route(scope)
        if route is None:
            return self.max_bytes, small
        large = (
            f"The request body is larger than the {human_bytes(route.limit)} limit for {route.what}; "
            "nothing was kept. Send a smaller file."
        )
        if announced is not None and announced <= self.max_bytes:
            return route.limit, large  # small enough for anyone: no need to look the user up
        if self.authenticate is not None and await self.authenticate(scope):
            return route.limit, large
        return self.max_bytes, (
            f"{route.what.capitalize()} larger than {human_bytes(self.max_bytes)} are accepted only from a "
            "logged-in user: log in (or send an Authorization: Token header) and try again."
        )

    def _upload_route(self, scope: Scope) -> UploadRoute | None:
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        for route in self.upload_routes:
            if route.method == method and route.pattern.fullmatch(path):
                return route
        return None


async def respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The unread body is still on the wire: the connection cannot carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- Django glue: the routes and the authentication check from settings ---


def upload_routes_from_settings() -> list[UploadRoute]:
    from django.conf import settings

    slide_limit = settings.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES
    import_limit = settings.MAX_IMPORT_BYTES + MULTIPART_OVERHEAD_BYTES
    # [0-9], not \d: Django's <int:> converter matches ASCII digits only.
    return [
        UploadRoute("POST", re.compile(r"/api/v1/projects/[0-9]+/slides/"), slide_limit, "slide uploads"),
        UploadRoute("POST", re.compile(r"/projects/[0-9]+/slides/upload/"), slide_limit, "slide uploads"),
        UploadRoute("POST", re.compile(r"/api/v1/projects/[0-9]+/import/"), import_limit, "label imports"),
        UploadRoute("POST", re.compile(r"/api/v1/projects/[0-9]+/regions/"), import_limit, "region imports"),
    ]


def _credentials(scope: Scope) -> tuple[str | None, str | None]:
    """(session key, token key) as sent; either may be None."""
    from django.conf import settings
    from django.http import parse_cookie

    token = None
    authorization = header(scope, b"authorization")
    if authorization is not None:
        parts = authorization.decode("latin-1").split()
        if len(parts) == 2 and parts[0].lower() == "token":
            token = parts[1]
    session_key = None
    cookie = header(scope, b"cookie")
    if cookie is not None:
        session_key = parse_cookie(cookie.decode("latin-1")).get(settings.SESSION_COOKIE_NAME)
    return session_key, token


def _is_authenticated(session_key: str | None, token: str | None) -> bool:
    from importlib import import_module
    from types import SimpleNamespace

    from django.conf import settings
    from django.contrib.auth import get_user
    from rest_framework.authtoken.models import Token

    if token and Token.objects.filter(key=token, user__is_active=True).exists():
        return True
    if session_key:
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        # get_user checks what a request would: the backend, an active user, the session hash.
        return bool(get_user(SimpleNamespace(session=store)).is_authenticated)  # type: ignore[arg-type]
    return False


async def django_authenticate(scope: Scope) -> bool:
    """True when the request carries a valid session or token of an active user."""
    from channels.db import database_sync_to_async

    session_key, token = _credentials(scope)
    if not (session_key or token):
        return False
    return bool(await database_sync_to_async(_is_authenticated)(session_key, token))


def from_settings(app: ASGIApp) -> RequestBodyLimit:
    from django.conf import settings

    return RequestBodyLimit(
        app,
        max_bytes=settings.MAX_REQUEST_BYTES,
        upload_routes=upload_routes_from_settings(),
        authenticate=django_authenticate,
    )
