"""Fixtures for tests that need real processes: a Celery worker on the real broker."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

from tests.servers import REPO_ROOT, celery_worker, purge_task_queues

__all__ = ["REPO_ROOT", "celery_worker_process", "test_database_url", "wait_for"]


def test_database_url() -> str:
    """DATABASE_URL pointing at the database pytest-django created for this session."""
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + settings.DATABASES["default"]["NAME"]))


@pytest.fixture(scope="session")
def celery_worker_process(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen]:
    """A real `celery worker` process consuming the gpu and cpu queues against the test database.

    Tests that use it must commit their data (``transactional_db``) so the worker sees it. The messages
    already on the broker's queues are dropped first: they were sent by tests whose data is gone (rolled
    back, or flushed) or by an earlier run on the same broker, and this worker must run only what the
    tests that use it send.
    """
    purge_task_queues()
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    env = dict(os.environ)
    env["DATABASE_URL"] = test_database_url()
    env["MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env["LEARNER_CACHE_DIR"] = settings.LEARNER["CACHE_DIR"]
    env["LEARNER_WEIGHTS_DIR"] = settings.LEARNER["WEIGHTS_DIR"]
    env["LEARNER_PRETRAINED_DIR"] = settings.LEARNER["PRETRAINED_DIR"]
    env.pop("TEST_DATABASE_NAME", None)
    with celery_worker(env, log, queues="gpu,cpu", name=f"test-{os.getpid()}@%h", timeout=120) as proc:
        proc.log_path = log  # type: ignore[attr-defined]
        yield proc


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, message: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"Timed out after {timeout:.0f}s waiting for {message}")


@pytest.fixture
def labelled():  # type: ignore[no-untyped-def]
    """6 patches; an expert labels all; three crowd members label all, one of them always 'benign'."""
    from annotations import voting
    from annotations.models import Role, Vote
    from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member

    project = ProjectFactory(votes_required=3, consensus_method="dawid_skene")
    slide = SlideFactory(project=project, name="case-1.svs")
    patches = PatchFactory.create_batch(6, slide=slide)
    truth = ["adenocarcinoma", "benign", "squamous", "adenocarcinoma", "benign", "squamous"]
    expert = member(project, Role.EXPERT, username="dr_expert")
    good1, good2, lazy = (member(project, Role.CROWD, username=n) for n in ("ann", "bob", "lazy"))
    for patch, label in zip(patches, truth, strict=True):
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=label)
        for user, answer in ((good1, label), (good2, label), (lazy, "benign")):
            answer_label = project.label_classes.get(name=answer)
            Vote.objects.create(project=project, patch=patch, annotator=user, label=answer_label, role=Role.CROWD)
    return project, patches, truth, expert
