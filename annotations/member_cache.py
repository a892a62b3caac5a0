"""Who a request's credential is, and their role in a project, remembered between requests.

Why: before next-task or vote does any work, DRF looks up the token's (or session's) user and the
view looks up the membership and its project: two or three queries whose ORM building cost as much
CPU as the lease itself. An annotator sends the same credential for the same project hundreds of
times an hour, so both answers are kept in this process:

- :class:`CachedAuthentication` (DRF's authentication for the whole API) remembers the user of a
  session cookie or an API token; a session hit still has its CSRF token checked, as DRF's
  SessionAuthentication does;
- :func:`member_project` remembers (user, project) -> the project row and the user's role, for the
  views that only read the project (next-task, votes).

Kept honest, in this order:

- a user, token, membership or project saved or deleted through the ORM, a session deleted, and
  every logout, clears this process's entries at once and bumps a generation number in the shared cache
  (Redis); every other server process reads that number at most once per
  ``GENERATION_CHECK_SECONDS`` and clears its own entries when it moved. So a removed member, a
  revoked token, a deactivated user or a changed project setting reaches every process within about
  a second;
- a change that bypasses the ORM's signals (``QuerySet.update``, SQL) is seen after
  ``TTL_SECONDS`` at the latest, when the entry expires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db.models.signals import post_delete, post_save
from rest_framework.authentication import BaseAuthentication, SessionAuthentication, TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

from .models import Membership, Project

logger = logging.getLogger(__name__)

TTL_SECONDS = 30.0
GENERATION_CHECK_SECONDS = 1.0
GENERATION_KEY = "member-cache-generation"


class _Entries:
    """Bounded LRU of key -> value, each valid for ``ttl`` seconds, emptied when the generation moves."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._generation: Any = None
        self._checked_at = 0.0

    def _check_generation(self, now: float) -> None:
        if now - self._checked_at < GENERATION_CHECK_SECONDS:
            return
        self._checked_at = now
        try:
            generation = cache.get(GENERATION_KEY)
        except Exception:  # the shared cache is down: entries still expire after TTL_SECONDS
            logger.warning("member cache: could not read the generation; relying on the TTL", exc_info=True)
            return
        if generation != self._generation:
            self._entries.clear()
            self._generation = generation

    def get(self, key: tuple) -> Any:
        now = time.monotonic()
        with self._lock:
            self._check_generation(now)
            entry = self._entries.get(key)
            if entry is None or entry[0] < now:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + TTL_SECONDS, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self, generation: Any = None) -> None:
        """Forget every entry; ``generation`` is the shared number this process just set, if it did."""
        with self._lock:
            self._entries.clear()
            if generation is not None:
                self._generation = generation


entries = _Entries()


def forget_everything(**_: Any) -> None:
    """Clear this process's entries and tell the other processes to clear theirs."""
    generation = None
    try:
        generation = 1 if cache.add(GENERATION_KEY, 1, timeout=None) else cache.incr(GENERATION_KEY)
    except Exception:
        logger.warning("member cache: could not bump the generation; other processes rely on the TTL", exc_info=True)
    # This process knows the number it set, so it does not clear what it remembers after this again.
    entries.clear(generation)


for _model in (get_user_model(), Token, Membership, Project):
    post_save.connect(forget_everything, sender=_model, dispatch_uid=f"member-cache-save-{_model.__name__}")
    post_delete.connect(forget_everything, sender=_model, dispatch_uid=f"member-cache-delete-{_model.__name__}")
# A session ends by being deleted (logout, flush); a saved session is a new key, never remembered yet.
post_delete.connect(forget_everything, sender=Session, dispatch_uid="member-cache-delete-Session")
user_logged_out.connect(forget_everything, dispatch_uid="member-cache-logout")


class CachedAuthentication(BaseAuthentication):
    """DRF's session then token authentication, the answer remembered per credential.

    The same order and answers as listing SessionAuthentication and TokenAuthentication: a valid
    session wins over a token header, an unauthenticated request gets 403 (no WWW-Authenticate)."""

    session = SessionAuthentication()
    token = TokenAuthentication()

    def authenticate(self, request: Request) -> tuple[Any, None] | None:
        session_key = request._request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        if session_key:
            user = entries.get(("session", session_key))
            if user is not None:
                self.session.enforce_csrf(request)
                return user, None
            found = self.session.authenticate(request)
            if found is not None:
                entries.put(("session", session_key), found[0])
                return found
        header = request._request.headers.get("Authorization", "")
        key = header[6:].strip() if header[:6].lower() == "token " else ""
        if key:
            user = entries.get(("token", key))
            if user is not None:
                return user, None
        found = self.token.authenticate(request)
        if found is not None and key:
            entries.put(("token", key), found[0])
        return found


def member_project(user: Any, project_id: int, *, roles: tuple[str, ...] | None = None) -> tuple[Project, str]:
    """:func:`annotations.permissions.project_for`, remembered per (user, project).

    Only for views that do not change the project they get: the row is shared by later requests."""
    from .permissions import check_role, project_for

    key = ("member", getattr(user, "pk", None), project_id)
    found = entries.get(key) if key[1] is not None else None
    if found is None:
        found = project_for(user, project_id)  # 404 for non-members is never remembered
        if key[1] is not None:
            entries.put(key, found)
    check_role(found[1], roles)
    return found
