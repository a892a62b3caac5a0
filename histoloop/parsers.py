"""The JSON parser every API view uses.

It turns what Python's ``json`` would let through into 400s: nesting deep enough to hit the recursion
limit, and numbers that overflow to infinity (``1e400``); NaN/Infinity literals are refused too.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"The number {text[:20]} is too large.")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number; send a finite number.")


class JSONParser(parsers.JSONParser):
    """DRF's parser, with a clear 400 for over-deep nesting and for numbers too large for a float."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.getreader(encoding)(stream)
            return json.load(text, parse_float=_finite_float, parse_constant=_no_constant)
        except RecursionError as exc:
            raise ParseError("JSON parse error - the body is nested too deeply.") from exc
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
