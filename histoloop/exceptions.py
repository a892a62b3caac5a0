"""The API's exception handler: DRF's, plus a JSON 413 for a body over Django's in-memory limit and a JSON
400 for a body Django finds suspicious (too many form fields).

Behind the ASGI body limit (histoloop.body_limit) such a body never reaches Django; this covers the
other ways in (the test client, a WSGI server), which would otherwise get Django's HTML 400 page.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DataError
from django.http import HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DataError):
        # The last line of defence for values validation let through: PostgreSQL refuses NUL in text
        # and numbers outside its types' range. Nothing was written (the statement failed).
        return Response(
            {
                "detail": "A value is out of range or holds characters that cannot be stored (such as NUL).",
                "code": "invalid",
            },
            status=400,
        )
    if isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": "The request body is larger than this endpoint accepts; send less.", "code": "too_large"},
            status=413,
        )
    if isinstance(exc, SuspiciousOperation):
        # A form body with more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS (TooManyFieldsSent) and the like,
        # raised while DRF parses request.data: Django would answer its HTML 400 page.
        return Response({"detail": f"The request was refused: {exc}", "code": "invalid"}, status=400)
    return drf_exception_handler(exc, context)


@csrf_exempt  # a 404 for any method: there is no form here for a cross-site request to abuse
def api_not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """Any /api/ URL that names no endpoint (a malformed id included): a JSON 404, as the API's own are."""
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:  # pragma: no cover - the catch-all matches every /api/ path
            match = None
        if match is not None and match.func is not api_not_found:
            # What APPEND_SLASH would have redirected to, said plainly (a redirect loses a POST body).
            return JsonResponse({"detail": f"No such endpoint; did you mean {request.path}/ ?"}, status=404)
    return JsonResponse({"detail": "No such endpoint or object; see /api/v1/docs/."}, status=404)
