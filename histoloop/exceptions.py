"""The API's exception handler: DRF's, plus a JSON 413 for a body over Django's in-memory limit.

Behind the ASGI body limit (histoloop.body_limit) such a body never reaches Django; this covers the
other ways in (the test client, a WSGI server), which would otherwise get Django's HTML 400 page.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": "The request body is larger than this endpoint accepts; send less.", "code": "too_large"},
            status=413,
        )
    return drf_exception_handler(exc, context)
