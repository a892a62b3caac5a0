"""Helpers and fixtures shared by the test_slides_* modules (this module holds no tests of its own)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.test import Client, override_settings
from PIL import Image

from annotations.models import Project, Role, Slide
from annotations.slides import access, ingest, tiles
from tests.conftest import SLIDES_DIR
from tests.factories import ProjectFactory, member

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
    slide = ingest.add_slide_from_path(project, path, launch=False)
    result = ingest.ingest(slide.pk)
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
    access.access_cache.clear()
    tiles.shared_cache.clear()  # tiles cached by an earlier test (or run) would hide what a test renders
    tiles.clear_stored_tiles()
    yield
    access.access_cache.clear()


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[SimpleNamespace]:  # type: ignore[no-untyped-def]
    """One ingested TCGA slide shared by the module (ingesting it takes a second or two)."""
    root = tmp_path_factory.mktemp("tiles-media")
    with override_settings(MEDIA_ROOT=root, PASSWORD_HASHERS=FAST_HASHERS):
        with django_db_blocker.unblock():
            project = ProjectFactory(patch_size=224, magnification=20.0)
            slide = ingest_file(project, shared_slide(TCGA))
            viewer = member(project, Role.CROWD)
        yield SimpleNamespace(project=project, slide=slide, viewer=viewer)
        with django_db_blocker.unblock():
            project.delete()
            viewer.delete()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def project(world):  # type: ignore[no-untyped-def]
    return world.project


@pytest.fixture
def tcga(world):  # type: ignore[no-untyped-def]
    return world.slide


@pytest.fixture
def viewer(world):  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(world.viewer)
    return client


def jpeg(response) -> Image.Image:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.content[:200]
    assert response["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    return image
