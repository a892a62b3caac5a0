"""Celery tasks of the annotations app (the slide ingest task is in annotations/slides/tasks.py, under
this module's name). settings.CELERY_TASK_ROUTES sends ``annotations.tasks.*`` to the ``cpu`` queue."""

from __future__ import annotations

from celery import shared_task


@shared_task(
    name="annotations.tasks.recompute_project_consensus", acks_late=True, soft_time_limit=3000, time_limit=3300
)
def recompute_project_consensus_task(project_id: int) -> int:
    """Recompute a project's consensus with its current settings (after its suggestion weight changed).
    Idempotent: a repeated message computes the same rows and writes none. Returns the rows computed."""
    from .consensus import recompute_project_consensus
    from .models import Project

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0  # deleted since
    return recompute_project_consensus(project)
