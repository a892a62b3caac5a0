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


@shared_task(name="annotations.tasks.refresh_reliabilities", acks_late=True, soft_time_limit=300, time_limit=360)
def refresh_reliabilities_task(project_id: int) -> int:
    """Refit the project's crowd reliabilities (annotations.reliability), scheduled by its votes. Returns the
    votes the fit used (0 for a deleted project, -1 when another refresh was running: it is scheduled again)."""
    from .models import Project
    from .reliability import _schedule, refresh, refresh_scheduled

    refresh_scheduled(project_id)
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0
    fit = refresh(project)
    if fit is None:
        _schedule(project_id)  # the running one may have read its votes before the latest ones
        return -1
    return fit.n_votes


@shared_task(name="annotations.tasks.refresh_agreement", acks_late=True, soft_time_limit=1700, time_limit=1800)
def refresh_agreement_task(project_id: int) -> bool:
    """Compute a large project's agreement report and keep it for the dashboard (annotations.agreement).
    Returns False for a deleted project."""
    from .agreement import refresh_report
    from .models import Project

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return False
    refresh_report(project)
    return True
