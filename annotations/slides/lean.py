"""The lean tile route: ``GET /api/v1/slides/{id}/tiles/{z}/{x}/{y}.jpeg`` answered in ASGI, before Django.

A viewer asks for dozens of tiles a second; through Django each costs the whole middleware stack,
the URL resolver and the view machinery, several times the cost of a stored tile itself. So
:class:`LeanTiles` (mounted in histoloop/asgi.py in front of Django) answers a tile request itself
when, and only when, the request's credential (session cookie or API token) was authorised for
that slide within ``access.ACCESS_TTL_SECONDS`` by the Django view: it looks the credential up in
the same :data:`annotations.slides.access.access_cache` the view fills. Everything else goes to
Django unchanged: a first request, an expired or unknown credential, an outsider (never cached, so
always refused by Django), any method but GET/HEAD, a host not in ALLOWED_HOSTS, plain HTTP where
SECURE_SSL_REDIRECT wants a redirect. So authorisation stays in one place (the view and
:func:`access.slide_access`), and the authorisation matrix, which proves it for every role, still
covers what the lean route serves. Responses carry the same ETag/304 behaviour and the security
headers SecurityMiddleware and XFrameOptionsMiddleware would add.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host

from . import tiles
from .access import access_cache, credential_for

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TILE_PATH = re.compile(r"^/api/v1/slides/(\d+)/tiles/(\d+)/(\d+)/(\d+)\.jpeg$")
CACHE_CONTROL = b"private, max-age=31536000, immutable"


def _allowed_hosts() -> list[str]:
    # As HttpRequest.get_host: with DEBUG and no ALLOWED_HOSTS, the local names.
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def security_headers(secure: bool) -> list[tuple[bytes, bytes]]:
    """What SecurityMiddleware and XFrameOptionsMiddleware add to a response, from the same settings."""
    headers = []
    if secure and settings.SECURE_HSTS_SECONDS:
        value = f"max-age={settings.SECURE_HSTS_SECONDS}"
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
            value += "; includeSubDomains"
        if settings.SECURE_HSTS_PRELOAD:
            value += "; preload"
        headers.append((b"strict-transport-security", value.encode()))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        policy = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"referrer-policy", policy.encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    headers.append((b"x-frame-options", getattr(settings, "X_FRAME_OPTIONS", "DENY").upper().encode()))
    return headers


class LeanTiles:
    """ASGI middleware: tiles for already-authorised credentials here, every other request to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.hosts = _allowed_hosts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = TILE_PATH.match(scope["path"])
            if match is not None and await self._serve(scope, send, *(int(g) for g in match.groups())):
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, send: Send, slide_id: int, z: int, x: int, y: int) -> bool:
        """Answer the request and return True, or return False (having sent nothing) to hand it to Django."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers[name] = headers[name] + b"; " + value if name == b"cookie" and name in headers else value
        secure = self._secure(scope, headers)
        if settings.SECURE_SSL_REDIRECT and not secure:
            return False
        host, _ = split_domain_port(headers.get(b"host", b"").decode("latin-1"))
        if not host or not validate_host(host, self.hosts):
            return False
        credential = credential_for(headers.get(b"authorization", b"").decode("latin-1"), _session_key(headers))
        access = access_cache.get((credential, "slide", slide_id)) if credential else None
        if access is None:
            return False  # not (or no longer) known: Django authenticates and authorises
        tag = tiles.etag(access.checksum, "tile", z, x, y)
        common = [
            (b"etag", tag.encode()),
            (b"cache-control", CACHE_CONTROL),
            *security_headers(secure),
        ]
        if _not_modified(headers.get(b"if-none-match", b""), tag):
            await _respond(send, 304, common, b"", head=True)
            return True
        data = tiles.stored_tile(access.path, access.checksum, z, x, y)  # one pread, or None
        if data is None and access.checksum:
            data = await tiles.shared_cache.aget(tiles.cache_key(access.checksum, z, x, y))
        if data is None:
            try:
                data = await asyncio.to_thread(tiles.tile_jpeg, access.path, z, x, y, access.checksum)
            except (tiles.TileNotFound, tiles.SlideReadError) as exc:
                body = json.dumps({"detail": str(exc)}).encode()
                await _respond(send, 404, [(b"content-type", b"application/json"), *common[2:]], body)
                return True
        await _respond(send, 200, [(b"content-type", b"image/jpeg"), *common], data, head=scope["method"] == "HEAD")
        return True

    @staticmethod
    def _secure(scope: Scope, headers: dict[bytes, bytes]) -> bool:
        if scope.get("scheme") == "https":
            return True
        proxy = settings.SECURE_PROXY_SSL_HEADER
        if proxy:
            name = proxy[0].removeprefix("HTTP_").replace("_", "-").lower().encode()
            return headers.get(name, b"").split(b",")[0].strip().decode("latin-1") == proxy[1]
        return False


def _session_key(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(b"cookie")
    # Django's own parser (as request.COOKIES), so both routes read the same session key.
    return parse_cookie(raw.decode("latin-1")).get(settings.SESSION_COOKIE_NAME) if raw else None


def _not_modified(header: bytes, tag: str) -> bool:
    if not header:
        return False
    tags = {part.strip() for part in header.decode("latin-1").split(",")}
    return "*" in tags or tag in tags or f"W/{tag}" in tags


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, head: bool = False
) -> None:
    if status != 304:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
