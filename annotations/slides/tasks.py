"""The slide ingest task; its body is :func:`annotations.slides.ingest.ingest`.

The task keeps the name it had as ``annotations/tasks.py``, so messages queued before the move still
run, and settings.CELERY_TASK_ROUTES (``annotations.tasks.*``) still sends it to the ``cpu`` queue.
histoloop/celery.py imports this module in the worker.
"""

from __future__ import annotations

from celery import shared_task

from . import ingest


@shared_task(name="annotations.tasks.ingest_slide", acks_late=True, soft_time_limit=3000, time_limit=3300)
def ingest_slide(slide_id: int) -> str:
    """Read a slide's metadata, make its thumbnail and patch grid. Idempotent; returns the final status."""
    slide = ingest.ingest(slide_id)
    return slide.status if slide is not None else "missing"
