"""What next-task and vote answer, once the caller and their project are known.

Both the DRF views (annotations.api) and the lean queue route in front of Django
(annotations.lean_queue) call these, so the two ways in give the same answers by construction:
the views add authentication, validation and rendering through DRF, the lean route its own cheaper
equivalents for the requests it takes (and hands every other request to the views).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import queue, voting
from .models import Project, Role
from .serializers import ConsensusSerializer, task_data, vote_data


def truthy(value: Any) -> bool:
    """A query flag such as ``?ahead=1``: "1" or "true", in any case."""
    return str(value).lower() in {"1", "true"}


def next_task_answer(project: Project, user: Any, role: str, *, ahead: bool) -> dict[str, Any] | None:
    """The body of next-task: the user's lease (and with ``ahead`` a second one), None for 204."""
    task = queue.lease_next_task(project, user, role)
    if task is None:
        return None
    body = task_data(task, role)
    if ahead:
        second = queue.lease_ahead(project, user, role, task)
        body["ahead"] = task_data(second, role) if second else None
    return body


def vote_answer(project: Project, user: Any, role: str, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Cast a vote from VoteInputSerializer's validated data: (status, body), 201 or the queue's refusal."""
    try:
        outcome = voting.cast_vote(
            project,
            user,
            role,
            patch_id=data["patch"],
            label=data["label"],
            task_id=data.get("task"),
            time_spent_ms=data["time_spent_ms"],
        )
    except queue.QueueError as exc:
        return exc.status_code, {"detail": str(exc)}
    body: dict[str, Any] = {"vote": vote_data(outcome.vote)}
    if role != Role.CROWD:
        body["consensus"] = ConsensusSerializer(outcome.consensus).data
    if data["next"]:
        # Saves the annotator a round trip: the next lease comes back with the vote.
        task = queue.lease_next_task(project, user, role)
        body["next"] = task_data(task, role) if task else None
    if data["ahead"]:
        # The client already holds the task it shows next: lease one more to load ahead.
        ahead = queue.lease_next_task(project, user, role, fresh=True)
        body["ahead"] = task_data(ahead, role) if ahead else None
    if outcome.gold_answer is not None:
        body["gold"] = {
            "correct": outcome.gold_answer.pk == outcome.vote.label_id,
            "expert_label": outcome.gold_answer.name,
        }
    return 201, body
