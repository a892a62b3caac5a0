"""The dashboard's project counters, cached for a few seconds.

Counting a million-task queue or three million votes takes a scan each; the annotator asks for its
stats after every vote and the dashboard on every refresh. So project-wide counts are computed at
most once per ``CACHE_SECONDS`` per project and shared by every server process through the cache
(Redis); a person's own counts stay live (they come from an index on their own votes).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Q

from . import queue
from .models import Consensus, Patch, Project, Role, Vote

CACHE_SECONDS = 5


def _cached(project: Project, name: str, compute: Any) -> Any:
    # created_at in the key: a project id reused (a fresh database) never reads another's counts.
    key = f"histoloop:stats:{name}:{project.pk}:{project.created_at.timestamp():.6f}"
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.set(key, value, CACHE_SECONDS)
    return value


def queue_counts(project: Project) -> dict[str, int]:
    """Open, leased and done tasks, open expert reviews and gold patches (``queue.QueueStats``)."""
    return _cached(project, "queue", lambda: asdict(queue.queue_stats(project)))


def label_counts(project: Project) -> dict[str, Any]:
    """Consensus by status, patches, active votes, annotators who voted, and labelled patches."""

    def compute() -> dict[str, Any]:
        active = Vote.objects.filter(project=project, is_active=True)
        # One scan of the project's votes for all three counts. Every vote cast was paid for, so the
        # cost counts the corrected and undone ones too.
        cast = Vote.objects.filter(project=project).aggregate(
            active=Count("id", filter=Q(is_active=True)),
            crowd=Count("id", filter=Q(role=Role.CROWD)),
            expert=Count("id", filter=~Q(role=Role.CROWD)),
        )
        return {
            "consensus": dict(Consensus.objects.filter(project=project).values_list("status").annotate(n=Count("id"))),
            "patches": Patch.objects.filter(project=project).count(),
            "votes": cast["active"],
            "votes_cast": {"crowd": cast["crowd"], "expert": cast["expert"]},
            "annotators": active.values("annotator").distinct().count(),
            "labelled": Consensus.objects.filter(project=project, label__isnull=False)
            .filter(~Q(status=Consensus.Status.PENDING))
            .count(),
        }

    counts = _cached(project, "labels", compute)
    # Priced outside the cache: a changed cost applies at once.
    cast = counts["votes_cast"]
    return {
        **counts,
        "annotation_cost": annotation_cost(project, crowd_votes=cast["crowd"], expert_votes=cast["expert"]),
    }


def annotation_cost(project: Project, *, crowd_votes: int, expert_votes: int) -> float:
    """Votes priced at the project's relative costs (an expert's vote and a crowd member's)."""
    return expert_votes * project.expert_cost + crowd_votes * project.crowd_cost
