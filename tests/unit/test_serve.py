"""The production server command's worker count."""

from __future__ import annotations

import pytest

from histoloop import serve


def test_workers_default_to_web_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert serve.default_workers() == 3


def test_workers_default_to_the_cores_capped_at_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.setattr(serve.os, "cpu_count", lambda: 32)
    assert serve.default_workers() == 8
    monkeypatch.setattr(serve.os, "cpu_count", lambda: None)
    assert serve.default_workers() == 1
