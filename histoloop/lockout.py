"""Login throttling glue for django-axes: the backend in AUTHENTICATION_BACKENDS and the page it
shows a locked-out login (settings.AXES_LOCKOUT_CALLABLE)."""

from __future__ import annotations

import math
from typing import Any

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


class LoginThrottleBackend(AxesStandaloneBackend):
    """django-axes' check, for logins that come with a request (every login form, DRF's).

    A call to authenticate() without one (the test client's ``login()``, a management command)
    has no address to count failures for; axes' own backend raises there, this one lets the next
    backend decide, as axes' failure counting also skips such calls."""

    def authenticate(self, request: HttpRequest | None, *args: Any, **kwargs: Any) -> None:
        if request is None:
            return None
        return super().authenticate(request, *args, **kwargs)


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict[str, Any] | None = None
) -> HttpResponse:
    from axes.helpers import get_client_username

    context = {
        "username": get_client_username(request, credentials) or "",
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "minutes": math.ceil(settings.AXES_COOLOFF_TIME.total_seconds() / 60),
    }
    return render(request, "registration/locked_out.html", context, status=429)
