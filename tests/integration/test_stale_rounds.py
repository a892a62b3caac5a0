"""Stale-round recovery on a schedule: a round whose worker died is failed by the periodic check,
called as a function, sent through the broker to a real worker, and sent by a real `celery beat`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from histoloop.celery import app, beat_schedule
from learner.conf import learner_settings
from learner.models import TrainingRound
from learner.tasks import fail_stale_rounds_task
from tests.factories import ProjectFactory
from tests.integration.conftest import REPO_ROOT, wait_for
from tests.integration.conftest import test_database_url as database_url_of_the_tests

pytestmark = pytest.mark.django_db(transaction=True)


def running_round(silent_for: timedelta) -> TrainingRound:
    return TrainingRound.objects.create(
        project=ProjectFactory(), number=1, state="running", heartbeat_at=timezone.now() - silent_for
    )


def past_the_limit() -> timedelta:
    return timedelta(seconds=learner_settings().STALE_AFTER_SECONDS + 60)


def state(round_: TrainingRound) -> str:
    round_.refresh_from_db()
    return round_.state


def test_the_check_fails_silent_rounds_and_leaves_live_ones_running() -> None:
    dead = running_round(past_the_limit())
    alive = running_round(timedelta(seconds=5))
    assert fail_stale_rounds_task() == 1
    assert state(dead) == "failed"
    assert "stopped responding" in dead.error
    assert state(alive) == "running"


def test_the_check_goes_to_the_cpu_queue_not_behind_a_round_on_the_gpu_worker() -> None:
    def queue_of(task: str) -> str:
        return app.amqp.router.route({}, task)["queue"].name

    assert queue_of("learner.tasks.fail_stale_rounds") == "cpu"
    assert queue_of("learner.tasks.run_training_round") == "gpu"
    schedule = beat_schedule(60)["fail-stale-rounds"]
    assert schedule["task"] == fail_stale_rounds_task.name
    assert schedule["options"] == {"queue": "cpu", "expires": 60}


def test_a_real_worker_runs_the_check_sent_through_the_broker(celery_worker_process: subprocess.Popen) -> None:
    dead = running_round(past_the_limit())  # made after the worker's start-up check ran
    fail_stale_rounds_task.delay()
    wait_for(lambda: state(dead) == "failed", timeout=30, message="the worker to fail the silent round")


@pytest.fixture
def beat(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`celery beat` sending the check every second, on the test database and broker."""
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url_of_the_tests(), MEDIA_ROOT=str(settings.MEDIA_ROOT), STALE_CHECK_SECONDS="1")
    env.pop("TEST_DATABASE_NAME", None)
    log = tmp_path / "beat.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "histoloop", "beat", "-l", "info", "-s", str(tmp_path / "schedule")],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_beat_fails_a_dead_workers_round_without_anyone_listing_rounds(
    celery_worker_process: subprocess.Popen, beat: subprocess.Popen
) -> None:
    dead = running_round(past_the_limit())
    wait_for(lambda: state(dead) == "failed" or beat.poll() is not None, timeout=45, message="beat's check")
    assert state(dead) == "failed", beat.log_path.read_text()  # type: ignore[attr-defined]
    assert "learner.tasks.fail_stale_rounds" in beat.log_path.read_text()  # type: ignore[attr-defined]
