"""Test session set-up: real PostgreSQL and Redis (the machine's via env URLs, else embedded)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings as hypothesis_settings

from histoloop import embedded

# Property tests assert behaviour, never speed (benchmarks under tests/bench time things): on a shared,
# loaded machine a first call that waits 300 ms for a core is not a failure.
hypothesis_settings.register_profile("histoloop", deadline=None)
hypothesis_settings.load_profile("histoloop")

os.environ.setdefault("FAST_PASSWORD_HASHING", "1")  # inherited by the worker/ASGI subprocesses too
embedded.ensure_environment()

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SLIDES_DIR = SHARED_DATA / "slides"
LC25000_DIR = SHARED_DATA / "lc25000_lung"
