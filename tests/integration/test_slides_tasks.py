"""The ingest task: called as a function, registered and routed under its stable name, and run by a
real Celery worker process on the real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from annotations.models import Role, Slide
from annotations.slides import tasks
from tests.factories import ProjectFactory, member

from . import test_slides_support as support
from .conftest import wait_for
from .test_slides_support import CMU, shared_slide

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_the_task_ignores_a_slide_that_no_longer_exists(media):  # type: ignore[no-untyped-def]
    assert tasks.ingest_slide(987654321) == "missing"


# What a worker does at start (autodiscovery included), in a fresh interpreter: in this one the
# test module's own import of annotations.slides.tasks has already registered the task.
WORKER_TASKS = """
import json
from histoloop.celery import app
app.loader.import_default_modules()
names = sorted(name for name in app.tasks if not name.startswith("celery."))
print(json.dumps({name: app.amqp.router.route({}, name)["queue"].name for name in names}))
"""


def test_a_starting_worker_registers_the_task_under_its_old_name_on_the_cpu_queue() -> None:
    # Messages queued before the task moved to annotations/slides/tasks.py carry this name.
    done = subprocess.run(
        [sys.executable, "-c", WORKER_TASKS], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    queues = json.loads(done.stdout.strip().splitlines()[-1])
    assert queues["annotations.tasks.ingest_slide"] == "cpu"


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
