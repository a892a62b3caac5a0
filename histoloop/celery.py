"""The Celery application. Two queues: ``gpu`` (training rounds) and ``cpu`` (slide ingest and
periodic checks), and the schedule ``celery beat`` follows."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")

app = Celery("histoloop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # <app>.tasks of every installed app: learner.tasks
# The slide tasks live in a subpackage of annotations, where autodiscovery does not look on its own.
app.autodiscover_tasks(["annotations.slides"])


def beat_schedule(every: float) -> dict[str, dict[str, object]]:
    """What ``celery beat`` sends. Stale-round recovery: a worker killed mid-round cannot mark its
    round failed, and without this the round would stay ``running`` until someone listed rounds.
    Each check expires after one interval, so checks do not pile up while no worker consumes them."""
    return {
        "fail-stale-rounds": {
            "task": "learner.tasks.fail_stale_rounds",
            "schedule": every,
            "options": {"queue": "cpu", "expires": every},
        }
    }


app.conf.beat_schedule = beat_schedule(float(os.environ.get("STALE_CHECK_SECONDS", "60")))
