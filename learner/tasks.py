"""Celery tasks of the learner: thin wrappers that take ids and call the pipeline."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from .maps import compute_project_map
from .pipeline import run_round
from .services import fail_stale_rounds
from .shards import run_shard


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=False, name="learner.tasks.run_training_round")
def run_training_round(self, round_id: int) -> str:  # type: ignore[no-untyped-def]
    """Run one round. A redelivered message for a round that already started does nothing."""
    return run_round(round_id).state


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, name="learner.tasks.embed_shard")
def embed_shard(self, payload: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Embed one shard's missing patches into the embedding store (learner.shards). Idempotent, so a message
    redelivered after its worker died (``reject_on_worker_lost``) only does what is still missing."""
    return run_shard(payload, worker=self.request.hostname or "", task_id=self.request.id or "")


@shared_task(name="learner.tasks.compute_embedding_map", acks_late=True, soft_time_limit=3000, time_limit=3300)
def compute_embedding_map(project_id: int, force: bool = False) -> int | None:
    """Lay out a project's pool for the embedding map now (an admin's "Compute map"; rounds do it as their
    ``map`` stage). It embeds what the store lacks, so it runs on the ``gpu`` queue beside rounds. Returns
    the new map's id, or None when the stored map is already of this pool."""
    from annotations.models import Project

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return None
    stored = compute_project_map(project, force=force)
    return stored.pk if stored is not None else None


@shared_task(name="learner.tasks.fail_stale_rounds", ignore_result=True)
def fail_stale_rounds_task() -> int:
    """Fail running rounds whose worker went silent. Celery beat sends it every
    STALE_CHECK_SECONDS (histoloop/celery.py) on the ``cpu`` queue, so a dead or busy ``gpu``
    worker cannot hold it up; returns how many rounds it failed."""
    return fail_stale_rounds()


@worker_ready.connect
def _fail_rounds_left_by_dead_workers(**kwargs: object) -> None:
    fail_stale_rounds()


@shared_task(name="learner.tasks.build_similar_index", ignore_result=True)
def build_similar_index(project_id: int, model_id: str, dim: int) -> int:
    """Build the project's "more like this" index after a round (``learner.similar``), on the ``cpu``
    queue so the next round on the ``gpu`` worker need not wait for it. Returns the patches indexed."""
    from annotations.models import Project

    from .similar import build_index

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0  # deleted since the round
    pointer = build_index(project, model_id, dim)
    return int(pointer["n"]) if pointer else 0
