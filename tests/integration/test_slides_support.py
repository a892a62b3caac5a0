"""Helpers and fixtures shared by the slide/tile tests (this module holds no tests of its own)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.conf import settings

from annotations import slide_views, slides
from annotations.models import Project, Slide
from tests.conftest import SLIDES_DIR

TCGA = "tcga-cr-7395-01a-01-ts1.svs"
CMU = "cmu-1-small-region.svs"


def shared_slide(name: str) -> Path:
    """A file from the shared data set; a clear skip (not a silent pass) when the data set is absent."""
    path = SLIDES_DIR / name
    if not path.exists():
        pytest.skip(f"Shared test data is missing: {path} (set HISTOLOOP_SHARED_DATA to the data directory).")
    return path


def media_files(root: Path | None = None) -> set[str]:
    """Every file under MEDIA_ROOT, relative to it."""
    root = Path(root or settings.MEDIA_ROOT)
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def expected_media() -> set[str]:
    """The files the slide rows refer to: anything else in MEDIA_ROOT is stray."""
    names: set[str] = set()
    for file_name, thumbnail in Slide.objects.values_list("file", "thumbnail"):
        names.update(name for name in (file_name, thumbnail) if name)
    return names


def assert_no_stray_media() -> None:
    assert media_files() == expected_media()


def ingest_file(project: Project, path: Path) -> Slide:
    """Add a file the way the CLI does and run the ingest task's body inline."""
    slide = slides.add_slide_from_path(project, path, launch=False)
    result = slides.ingest(slide.pk)
    assert result is not None
    return result


@pytest.fixture
def media(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    """A fresh, empty MEDIA_ROOT for one test."""
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    yield root
    shutil.rmtree(root, ignore_errors=True)


FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_access_cache(settings):  # type: ignore[no-untyped-def]
    settings.PASSWORD_HASHERS = FAST_HASHERS  # factories hash a password per user; PBKDF2 costs ~0.3 s each
    slide_views.access_cache.clear()
    yield
    slide_views.access_cache.clear()
