"""Who may see a slide's or a patch's pixels, and the credentials cache that remembers it.

:func:`slide_access` and :func:`patch_for` are the rules: a member of the project sees its slides
and patches; anyone else, and any slide that failed to process, gets Http404 (one query for the
row, one for the membership).

The image endpoints (:mod:`annotations.slides.views`) ask :func:`authorise`, which applies a rule
once per credential and then remembers the answer: who may see which slide is kept per credential
(session cookie or API token) for ``ACCESS_TTL_SECONDS``, so a viewer asking for dozens of tiles a
second reaches the database only on its first request. Removing a member therefore takes up to
that long to stop their tile requests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework.authtoken.models import Token

from annotations.models import Patch, Slide
from annotations.permissions import membership_role

ACCESS_TTL_SECONDS = 30.0


@dataclass(frozen=True)
class SlideAccess:
    """What the image endpoints need of a slide; paths are the row's stored ones, absolute."""

    slide_id: int
    project_id: int
    path: str
    checksum: str
    thumbnail: str = ""  # "" while the slide has no thumbnail (still processing)


def slide_access(user: Any, slide_id: int) -> SlideAccess:
    """The slide's file, for a member of its project; Http404 for anyone else or a slide without a file."""
    row = Slide.objects.filter(pk=slide_id).values("project_id", "file", "thumbnail", "checksum", "status").first()
    if row is None or membership_role(user, row["project_id"]) is None:
        raise Http404("No such slide.")
    if row["status"] == Slide.Status.FAILED or not row["file"]:
        raise Http404("This slide has no image; it failed to process.")
    return SlideAccess(
        slide_id=slide_id,
        project_id=row["project_id"],
        path=str(Path(settings.MEDIA_ROOT) / row["file"]),
        checksum=row["checksum"],
        # The stored path, never one rebuilt from ids: those are not unique across databases sharing
        # MEDIA_ROOT, and cloned rows point at their source's thumbnail.
        thumbnail=str(Path(settings.MEDIA_ROOT) / row["thumbnail"]) if row["thumbnail"] else "",
    )


def patch_for(user: Any, patch_id: int) -> Patch:
    """A patch (with slide and project loaded) for a member of its project; Http404 otherwise."""
    patch = Patch.objects.select_related("slide", "project").filter(pk=patch_id).first()
    if patch is None or membership_role(user, patch.project_id) is None:
        raise Http404("No such patch.")
    if patch.slide.status == Slide.Status.FAILED or not patch.slide.file:
        raise Http404("This patch's slide has no image.")
    return patch


class _AccessCache:
    """Bounded LRU of (credential, kind, id) -> access, each entry valid for ``ttl`` seconds."""

    def __init__(self, ttl: float = ACCESS_TTL_SECONDS, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


access_cache = _AccessCache()


class Refused(Exception):
    """The request may not have what it asked for; ``response`` is the JSON answer to send."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.response = JsonResponse({"detail": detail}, status=status)


def credential_for(authorization: str, session_key: str | None) -> str | None:
    """The cache key of a request's credential: its API token if it sends one, else its session cookie.

    Shared with the lean tile route (:mod:`annotations.slides.lean`), which reads the same cache.
    """
    if authorization[:6].lower() == "token ":
        raw = "t:" + authorization[6:].strip()
    elif session_key:
        raw = "s:" + session_key
    else:
        return None
    return hashlib.sha256(raw.encode()).hexdigest()


def _credential(request: HttpRequest) -> str | None:
    return credential_for(request.headers.get("Authorization", ""), request.COOKIES.get(settings.SESSION_COOKIE_NAME))


async def _user(request: HttpRequest) -> Any | None:
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "token ":
        token = await Token.objects.select_related("user").filter(key=header[6:].strip()).afirst()
        return token.user if token is not None and token.user.is_active else None
    user = await request.auser()
    return user if user.is_authenticated else None


async def authorise(request: HttpRequest, kind: str, object_id: int, resolve: Callable[[Any, int], Any]) -> Any:
    """``resolve(user, object_id)`` for the request's credential, cached; Refused (403 or 404) if not allowed."""
    credential = _credential(request)
    if credential is None:
        raise Refused(403, "Authentication credentials were not provided.")
    key = (credential, kind, object_id)
    cached = access_cache.get(key)
    if cached is not None:
        return cached
    user = await _user(request)
    if user is None:
        raise Refused(403, "Authentication credentials were not provided.")
    try:
        value = await sync_to_async(resolve)(user, object_id)
    except Http404 as exc:
        raise Refused(404, str(exc) or "Not found.") from exc
    access_cache.put(key, value)
    return value
