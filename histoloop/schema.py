"""The OpenAPI schema class: it documents the error answers every operation can give.

Every refusal is ``{"detail": "..."}`` (a 400 from field validation names each bad field instead),
so a client generated from the schema knows them.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import serializers
from rest_framework.authentication import TokenAuthentication


class ErrorSerializer(serializers.Serializer):
    """What every refusal looks like: a sentence saying what was wrong and what to do."""

    detail = serializers.CharField()
    code = serializers.CharField(required=False)


class BadRequestSerializer(serializers.Serializer):
    """A 400: ``detail`` for the request as a whole, or each invalid field with its messages."""

    detail = serializers.CharField(required=False)


# Answers any operation may give besides its own: who may not, what does not exist, what was bad.
COMMON_ERRORS: dict[str, tuple[type[serializers.Serializer], str]] = {
    "400": (BadRequestSerializer, "The request was malformed or a value was invalid; the body says which."),
    "403": (ErrorSerializer, "Not signed in, or your role in this project may not do this."),
    "404": (ErrorSerializer, "No such object, or it belongs to a project you are not a member of."),
}
WRITE_ERRORS: dict[str, tuple[type[serializers.Serializer], str]] = {
    "409": (ErrorSerializer, "The request conflicts with the current state (e.g. a second vote, an expired lease)."),
    "413": (ErrorSerializer, "The body is larger than this endpoint accepts."),
}


class AutoSchema(SpectacularAutoSchema):
    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:  # type: ignore[override]
        responses = super()._get_response_bodies(direction)  # type: ignore[arg-type]
        if direction != "response":
            return responses
        errors = dict(COMMON_ERRORS)
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            errors.update(WRITE_ERRORS)
        for code, (serializer, description) in errors.items():
            if code not in responses:
                body = self._get_response_for_code(serializer, code, direction=direction)  # type: ignore[arg-type]
                body["description"] = description
                responses[code] = body
        return responses


class CachedAuthenticationScheme(OpenApiAuthenticationExtension):
    """annotations.member_cache.CachedAuthentication is DRF's session or token authentication: either one."""

    target_class = "annotations.member_cache.CachedAuthentication"
    name = ["cookieAuth", "tokenAuth"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{"cookieAuth": []}, {"tokenAuth": []}]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        from django.conf import settings

        return [
            {"type": "apiKey", "in": "cookie", "name": settings.SESSION_COOKIE_NAME},
            build_bearer_security_scheme_object(header_name="Authorization", token_prefix=TokenAuthentication.keyword),
        ]
