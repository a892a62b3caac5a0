"""Several votes as one action (the accept-the-model strip, "more like this"): each through the normal
single-vote path (``voting.cast_vote``: append-only, one active vote per patch and annotator, consensus
recomputed), all in one transaction, so an action lands whole or not at all.

A patch the annotator already voted on (another tab, a race) is skipped and reported, not an error; any
other bad item (a patch of another project, an unknown label) refuses the whole action and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from .models import Consensus, Project, Vote
from .voting import VoteConflict, cast_vote

# One action labels at most this many patches (a strip, a page of neighbours).
MAX_ITEMS = 500


@dataclass
class QuickVoteResult:
    votes: list[Vote] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # patches the annotator had already voted on
    consensus: dict[int, Consensus] = field(default_factory=dict)


def cast_votes_in_one_action(
    project: Project,
    user: Any,
    role: str,
    items: Sequence[tuple[int, Any]],
    *,
    provenance: str,
    model_version_shown: int | None = None,
    crowd_without_task: bool = False,
) -> QuickVoteResult:
    """Vote ``label`` on each ``(patch id, label)`` of ``items`` in one transaction."""
    result = QuickVoteResult()
    with transaction.atomic():
        for patch_id, label in items:
            try:
                outcome = cast_vote(
                    project,
                    user,
                    role,
                    patch_id=patch_id,
                    label=label,
                    provenance=provenance,
                    model_version_shown=model_version_shown,
                    crowd_without_task=crowd_without_task,
                )
            except VoteConflict:
                result.skipped.append(int(patch_id))
                continue
            result.votes.append(outcome.vote)
            result.consensus[int(patch_id)] = outcome.consensus
    return result
