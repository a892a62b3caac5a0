"""The lean queue route: ``POST …/next-task/`` and ``POST …/votes/`` answered in ASGI, before Django.

Why: an annotator's every label is one next-task and one vote, and through Django each request paid
for the ten middleware, the URL resolver, DRF's request, negotiation, parsing, validation and
rendering: about twice the CPU of the lease and the vote themselves (README, issue 12). So
:class:`LeanQueue` (mounted in histoloop/asgi.py, inside the body limits) answers those two requests
itself when, and only when, they are the annotator's ordinary case:

- the credential is one Django already authenticated: a session cookie or API token found in
  :data:`annotations.member_cache.entries`, the cache DRF's authentication (``CachedAuthentication``)
  fills; a session's CSRF token is checked by DRF's own ``SessionAuthentication.enforce_csrf``;
- the caller is a member of the project (``member_project``, the views' own check, cached the same way);
- the host is allowed (Django's ``get_host``), no middleware's ``process_request`` would answer
  (an HTTPS redirect, a refused user agent), the client accepts JSON, and a vote's body is JSON
  that passes the strict subset of ``VoteInputSerializer`` checked here (whole numbers as JSON
  integers in range, a label as a clean string, booleans as JSON booleans, no other fields).

Everything else, with its body replayed, goes to Django unchanged, and nothing has been done for it:
so every refusal (anonymous, expired credential, outsider, malformed body, missing CSRF token) is
Django's and DRF's own answer, and the authorisation matrix and the fuzzer still prove it.

What the lean route runs is the views' own code (annotations.hot_path), the same request signals
(so the database connection is borrowed from and given back to the pool as for a view), in the same
request threads as Django (histoloop.asgi_handler), and the response goes through the response half
of the same middleware that shape an API answer's headers (security headers, the
Content-Security-Policy, X-Frame-Options, Content-Length). Middleware that do nothing for such a
request (sessions not touched, CSRF exempt views, no messages, static files, axes) are skipped; a
middleware this module does not know turns the route off (it says so in the log), so adding one to
settings.MIDDLEWARE cannot be silently bypassed. ``tests/integration/test_lean_queue.py`` compares
both routes' status, headers and body request by request. ``LEAN_QUEUE_ROUTE=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.exception import response_for_exception
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.log import log_response
from django.utils.module_loading import import_string
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import APIException
from rest_framework.renderers import JSONRenderer
from rest_framework.settings import api_settings

from histoloop.exceptions import exception_handler
from histoloop.parsers import _finite_float, _no_constant

from . import hot_path
from .member_cache import entries, member_project
from .serializers import MAX_ID

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NEXT_TASK_PATH = re.compile(r"^/api/v1/projects/(\d{1,18})/next-task/$")
VOTES_PATH = re.compile(r"^/api/v1/projects/(\d{1,18})/votes/$")

# Middleware whose request and response halves are run for a lean answer, in settings' order.
APPLIED = {
    "django.middleware.security.SecurityMiddleware",  # the HTTPS redirect; HSTS, nosniff, referrer, COOP
    "csp.middleware.CSPMiddleware",  # the Content-Security-Policy
    "django.middleware.common.CommonMiddleware",  # refused user agents, PREPEND_WWW; Content-Length
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
}
# Middleware that do nothing for these requests: the session is never loaded (the credential comes from
# the cache) nor saved; both views are CSRF exempt (DRF checks a session's token itself, as here) and
# never ask for a token; no messages are added; no static file is under these paths; axes acts on
# logins only.
NOTHING_TO_DO = {
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "axes.middleware.AxesMiddleware",
}
VOTE_FIELDS = {"patch", "label", "task", "time_spent_ms", "next", "ahead"}


def _whole(value: Any, low: int) -> bool:
    return type(value) is int and low <= value <= MAX_ID


def vote_input(body: bytes) -> dict[str, Any] | None:
    """VoteInputSerializer's validated data for a body inside the strict subset, else None (Django decides).

    The subset is what the annotator page sends; for it the serializer's answer is known: valid, with
    these values and defaults. Anything else (strings for numbers, floats, nulls where not allowed,
    blank or padded labels, unknown fields, non-JSON) is left to the serializer and its 400."""
    try:
        data = json.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if type(data) is not dict or not data.keys() <= VOTE_FIELDS:
        return None
    label = data.get("label")
    if type(label) is int:  # the annotator page sends the label's id; CharField takes it as its digits
        label = str(label)
    if not (_whole(data.get("patch"), 1) and type(label) is str and 0 < len(label) <= 100):
        return None
    if label.strip() != label or not label.isprintable():  # trimmed by CharField; NUL, surrogates refused
        return None
    task = data.get("task")
    if task is not None and not _whole(task, 1):
        return None
    if "time_spent_ms" in data and not _whole(data["time_spent_ms"], 0):
        return None
    if any(name in data and type(data[name]) is not bool for name in ("next", "ahead")):
        return None
    return {
        "patch": data["patch"],
        "label": label,
        **({"task": task} if "task" in data else {}),
        "time_spent_ms": data.get("time_spent_ms", 0),
        "next": data.get("next", False),
        "ahead": data.get("ahead", False),
    }


def _accepts_json(accept: str) -> bool:
    """Whether DRF's negotiation would pick its JSON renderer, plainly (no media type parameters)."""
    if not accept:
        return True
    kinds = {part.strip() for part in accept.split(",")}
    return bool(kinds & {"*/*", "application/*", "application/json"}) and ";" not in accept


def _middleware() -> list[Any] | None:
    """Instances of the APPLIED middleware in settings' order, or None if one is not known here."""
    chain = []
    for path in settings.MIDDLEWARE:
        if path in APPLIED:
            chain.append(import_string(path)(lambda request: None))
        elif path not in NOTHING_TO_DO:
            logger.warning("lean queue route off: it does not know what middleware %s does", path)
            return None
    return chain


def _view_headers() -> dict[str, dict[str, str]]:
    """The headers DRF's APIView adds to each view's answers (Allow; Vary: Accept with several renderers)."""
    from .api import NextTaskView, VoteListView

    views = {"next": NextTaskView(), "vote": VoteListView()}
    out = {}
    for name, view in views.items():
        view.setup(HttpRequest())  # as as_view() does per request: a view with GET answers HEAD too
        headers = {"Allow": ", ".join(view.allowed_methods)}
        if len(api_settings.DEFAULT_RENDERER_CLASSES) > 1:
            headers["Vary"] = "Accept"
        out[name] = headers
    return out


class LeanQueue:
    """ASGI middleware: the annotator's next-task and vote here when they are the ordinary case, all else to ``app``."""

    def __init__(self, app: ASGIApp, threads: Any = None) -> None:
        self.app = app
        self.middleware = _middleware()
        self.view_headers = _view_headers()
        self.renderer = JSONRenderer()
        self.session = SessionAuthentication()
        run_in_thread = getattr(threads, "run_in_thread", None)  # histoloop.asgi_handler.OneHopASGIHandler's
        if run_in_thread is None:
            pool = ThreadPoolExecutor(settings.HTTP_THREADS, thread_name_prefix="lean-queue")

            async def run_in_thread(func: Any, *args: Any) -> Any:
                return await asyncio.get_running_loop().run_in_executor(pool, func, *args)

        self.run_in_thread = run_in_thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.middleware is not None:
            path = scope["path"]
            match, name = NEXT_TASK_PATH.match(path), "next"
            if match is None:
                match, name = VOTES_PATH.match(path), "vote"
            if match is not None:
                body = await _read_body(receive)
                if body is None:
                    return  # the client went away
                response = await self.run_in_thread(self.answer, scope, body, name, int(match.group(1)))
                if response is not None:
                    await _send(send, response)
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def answer(self, scope: Scope, body: bytes, name: str, project_id: int) -> HttpResponseBase | None:
        """The response, or None (having changed nothing) for Django to answer."""
        try:
            request = ASGIRequest(scope, io.BytesIO(body))
        except Exception:  # headers Django refuses to read: its own answer
            return None
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            return self._answer(request, body, name, project_id)
        finally:
            signals.request_finished.send(sender=self.__class__)

    def _answer(self, request: ASGIRequest, body: bytes, name: str, project_id: int) -> HttpResponseBase | None:
        try:
            request.get_host()  # ALLOWED_HOSTS
            for middleware in self.middleware or ():
                if getattr(middleware, "process_request", None) and middleware.process_request(request):
                    return None  # a redirect or a refusal: Django's
        except Exception:
            return None
        if not _accepts_json(request.headers.get("Accept", "")):
            return None
        try:
            user = self._user(request)
        except Exception:
            return None
        if user is None:
            return None
        data: dict[str, Any] = {}
        if name == "vote":
            charset = request.content_params.get("charset", "utf-8").lower()
            found_data = vote_input(body) if request.content_type == "application/json" else None
            if found_data is None or charset not in ("utf-8", "utf8"):
                return None
            data = found_data
        try:
            project, role = member_project(user, project_id, roles=None)
        except Exception:  # not a member (Http404), a role refused (403), an id out of range: Django's answer
            return None
        try:
            if name == "next":
                found = hot_path.next_task_answer(
                    project, user, role, ahead=hot_path.truthy(request.GET.get("ahead", ""))
                )
                code, content = (204, None) if found is None else (200, found)
            else:
                code, content = hot_path.vote_answer(project, user, role, data)
            response = self._json(content, code, name)
        except Exception as exc:  # as a view's: the API's exception handler, else Django's 500
            refusal = exception_handler(exc, {"view": None, "args": (), "kwargs": {}, "request": request})
            if refusal is None:
                response = response_for_exception(request, exc)
            else:
                response = self._json(refusal.data, refusal.status_code, name)
                for header, value in refusal.items():
                    if header.lower() != "content-type":
                        response[header] = value
        for middleware in reversed(self.middleware or ()):
            response = middleware.process_response(request, response)
        if response.status_code >= 400:
            log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
        return response

    def _user(self, request: ASGIRequest) -> Any:
        """The cached user of the request's credential, in CachedAuthentication's order; None if not cached."""
        session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        if session_key:
            user = entries.get(("session", session_key))
            if user is None:
                return None  # DRF would look the session up (and a token after it): Django's
            try:
                self.session.enforce_csrf(request)  # type: ignore[arg-type]  # reads only the Django request
            except APIException:
                return None
            return user
        header = request.headers.get("Authorization", "")
        key = header[6:].strip() if header[:6].lower() == "token " else ""
        return entries.get(("token", key)) if key else None

    def _json(self, data: Any, code: int, name: str) -> HttpResponse:
        """As DRF's Response renders: compact JSON, and no Content-Type on an empty body."""
        if data is None:
            response = HttpResponse(b"", status=code)
            del response["Content-Type"]
        else:
            response = HttpResponse(self.renderer.render(data), status=code, content_type="application/json")
        for header, value in self.view_headers[name].items():
            response[header] = value
        return response


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then whatever the client sends next (its disconnect)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, response: HttpResponseBase) -> None:
    """As Django's ASGI handler sends a response that is not streamed."""
    headers = [(name.encode("ascii"), str(value).encode("latin-1")) for name, value in response.items()]
    for cookie in response.cookies.values():
        headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.content})  # type: ignore[attr-defined]
