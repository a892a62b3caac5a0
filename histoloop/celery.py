"""The Celery application. Two queues: ``gpu`` (training rounds) and ``cpu`` (slide ingest)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")

app = Celery("histoloop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # <app>.tasks of every installed app: learner.tasks
# The slide tasks live in a subpackage of annotations, where autodiscovery does not look on its own.
app.autodiscover_tasks(["annotations.slides"])
