"""The ingest task run by a real Celery worker process on the real broker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from annotations.models import Role, Slide
from tests.factories import ProjectFactory, member

from . import test_slide_support as support
from .conftest import wait_for
from .test_slide_support import CMU, shared_slide

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache


@pytest.mark.slow
def test_an_uploaded_slide_is_processed_by_the_cpu_worker(celery_worker_process, transactional_db):  # type: ignore[no-untyped-def]
    project = ProjectFactory()
    client = APIClient()
    client.force_authenticate(member(project, Role.ADMIN))
    content = shared_slide(CMU).read_bytes()

    response = client.post(
        f"/api/v1/projects/{project.pk}/slides/", {"file": SimpleUploadedFile(CMU, content)}, format="multipart"
    )
    assert response.status_code == 201, response.content
    slide_id = response.json()["id"]
    try:
        slide = wait_for(
            lambda: Slide.objects.exclude(status=Slide.Status.PROCESSING).filter(pk=slide_id).first(),
            timeout=90,
            message=f"slide {slide_id} to leave 'processing' (worker log: {celery_worker_process.log_path})",
        )
        assert slide.status == Slide.Status.READY, slide.error
        assert slide.patches.count() > 0
        assert slide.thumbnail and (Path(settings.MEDIA_ROOT) / slide.thumbnail.name).is_file()
        assert "annotations.tasks.ingest_slide" in celery_worker_process.log_path.read_text()
    finally:
        shutil.rmtree(Path(settings.MEDIA_ROOT) / "slides" / str(project.pk), ignore_errors=True)
        shutil.rmtree(Path(settings.MEDIA_ROOT) / "thumbnails" / str(project.pk), ignore_errors=True)
