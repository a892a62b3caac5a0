"""Test session set-up: real PostgreSQL and Redis (the machine's via env URLs, else embedded)."""

from __future__ import annotations

import os
from pathlib import Path

from histoloop import embedded

os.environ.setdefault("FAST_PASSWORD_HASHING", "1")  # inherited by the worker/ASGI subprocesses too
embedded.ensure_environment()

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SLIDES_DIR = SHARED_DATA / "slides"
LC25000_DIR = SHARED_DATA / "lc25000_lung"
