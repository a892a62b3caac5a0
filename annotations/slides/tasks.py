"""Celery tasks of the annotations app (routed to the ``cpu`` queue by settings.CELERY_TASK_ROUTES)."""

from __future__ import annotations

from celery import shared_task

from . import slides


@shared_task(acks_late=True, soft_time_limit=3000, time_limit=3300)
def ingest_slide(slide_id: int) -> str:
    """Read a slide's metadata, make its thumbnail and patch grid. Idempotent; returns the final status."""
    slide = slides.ingest(slide_id)
    return slide.status if slide is not None else "missing"
