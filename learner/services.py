"""Starting, cancelling and watching training rounds. The round itself runs in learner.pipeline."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from annotations.models import Project

from .conf import learner_settings
from .events import broadcast, round_payload
from .models import TrainingRound

State = TrainingRound.State


class RoundConflict(Exception):
    """A round is already queued or running for the project."""

    def __init__(self, active: TrainingRound) -> None:
        super().__init__(
            f"Round {active.number} is already {active.state} for this project; wait for it to finish or cancel it."
        )
        self.active = active


class RoundError(Exception):
    pass


def fail_stale_rounds(project: Project | None = None) -> int:
    """Mark running rounds whose worker went silent as failed (a killed worker cannot say so itself)."""
    limit = timezone.now() - timedelta(seconds=learner_settings().STALE_AFTER_SECONDS)
    stale = TrainingRound.objects.filter(state=State.RUNNING, heartbeat_at__lt=limit)
    if project is not None:
        stale = stale.filter(project=project)
    failed = 0
    for round_ in stale:
        failed += mark_failed(
            round_,
            "The worker running this round stopped responding (killed or crashed); "
            "the previous model and the queue are unchanged. Start a new round.",
        )
    return failed


def mark_failed(round_: TrainingRound, error: str) -> int:
    """Fail a queued or running round (one that has ended already stays as it ended)."""
    updated = TrainingRound.objects.filter(pk=round_.pk, state__in=TrainingRound.ACTIVE_STATES).update(
        state=State.FAILED, error=error, finished_at=timezone.now()
    )
    if updated:
        round_.refresh_from_db()
        broadcast(round_.project_id, round_payload(round_, "round.finished"))
    return updated


# How often start_round tries again when a concurrent request's round, ended since, was in the way.
START_ATTEMPTS = 3


def start_round(project: Project, user: Any = None, *, launch: bool = True) -> TrainingRound:
    """Queue a round on the ``gpu`` queue. Raises RoundConflict when one is active.

    ``launch=False`` creates the queued round without handing it to the broker: the caller runs it
    itself (``pipeline.run_round``), as the simulator does, so no worker on the same broker races it.
    """
    from .tasks import run_training_round

    fail_stale_rounds(project)
    for _ in range(START_ATTEMPTS):
        try:
            with transaction.atomic():
                round_ = TrainingRound.objects.create(
                    project=project,
                    requested_by=user if getattr(user, "is_authenticated", False) else None,
                    number=_next_number(project),
                    strategy=project.query_strategy,
                    train_mode=project.train_mode,
                    stage="queued",
                )
                if launch:
                    transaction.on_commit(partial(_launch, round_.pk, run_training_round))
        except IntegrityError as exc:
            active = TrainingRound.objects.filter(project=project, state__in=TrainingRound.ACTIVE_STATES).first()
            if active is not None:
                raise RoundConflict(active) from exc
            # Another request's round took this number or the one active slot, and has ended already (a round
            # that fails at once, e.g. with no broker): the slot and the next number are free, so try again.
            continue
        broadcast(project.pk, round_payload(round_))
        return round_
    raise RoundError("Could not start a round: other rounds kept taking its number; try again.")


def _next_number(project: Project) -> int:
    return (TrainingRound.objects.filter(project=project).aggregate(n=Max("number"))["n"] or 0) + 1


def _launch(round_id: int, task: Any) -> None:
    try:
        result = task.apply_async((round_id,), queue="gpu")
    except Exception as exc:  # broker down: say so on the round instead of leaving it queued forever
        round_ = TrainingRound.objects.get(pk=round_id)
        mark_failed(round_, f"The task queue is unavailable ({exc.__class__.__name__}); start the round again.")
        return
    TrainingRound.objects.filter(pk=round_id).update(celery_task_id=result.id)


def cancel_round(round_: TrainingRound) -> TrainingRound:
    """A queued round is cancelled at once; a running one stops at its next checkpoint."""
    with transaction.atomic():
        locked = TrainingRound.objects.select_for_update().get(pk=round_.pk)
        if locked.state == State.QUEUED:
            locked.state = State.CANCELLED
            locked.finished_at = timezone.now()
            locked.stage = "cancelled"
            locked.save(update_fields=["state", "finished_at", "stage"])
        elif locked.state == State.RUNNING:
            locked.cancel_requested = True
            locked.save(update_fields=["cancel_requested"])
        else:
            raise RoundError(f"Round {locked.number} has already {locked.state}; there is nothing to cancel.")
    broadcast(
        locked.project_id,
        round_payload(locked, "round.finished" if locked.state == State.CANCELLED else "round.progress"),
    )
    return locked
