"""Pruning old model versions: their weights files and scores go, their ModelVersion rows stay.

A ModelVersion row is the audit trail (which labels trained which model, its metrics, backbone and mode);
it is small and kept forever. What grows with every round is the weights file and the per-slide scores:
those of all but each project's ``keep`` newest versions are deleted, and ``pruned_at`` says when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from .models import ModelVersion, SlideScores


@dataclass
class PruneReport:
    versions: list[int] = field(default_factory=list)  # ids of the versions pruned (or to prune, dry run)
    score_rows: int = 0
    files: list[str] = field(default_factory=list)


def prune_model_versions(keep: int, *, project_id: int | None = None, dry_run: bool = False) -> PruneReport:
    """Delete the weights files and SlideScores of every model version but each project's ``keep`` newest.

    The files are removed only after the database change commits, so a failure leaves both as they were.
    """
    if keep < 1:
        raise ValueError("Keep at least one model version per project: the newest one serves the heatmap.")
    versions = ModelVersion.objects.all() if project_id is None else ModelVersion.objects.filter(project_id=project_id)
    report = PruneReport()
    for pid in versions.values_list("project_id", flat=True).distinct().order_by("project_id"):
        ordered = ModelVersion.objects.filter(project_id=pid).order_by("-created_at", "-id")
        old = list(ordered.filter(pruned_at__isnull=True).exclude(pk__in=ordered.values("pk")[:keep]))
        if not old:
            continue
        ids = [v.pk for v in old]
        files = [v.weights_path for v in old if v.weights_path]
        report.versions.extend(ids)
        report.files.extend(files)
        if dry_run:
            report.score_rows += SlideScores.objects.filter(model_version_id__in=ids).count()
            continue
        with transaction.atomic():
            report.score_rows += SlideScores.objects.filter(model_version_id__in=ids).delete()[0]
            ModelVersion.objects.filter(pk__in=ids).update(pruned_at=timezone.now())
            transaction.on_commit(lambda files=files, ids=ids: _remove(files, ids))  # type: ignore[misc]
    return report


def _remove(paths: list[str], version_ids: list[int]) -> None:
    from .model_export import remove_cached

    for path in paths:
        Path(path).unlink(missing_ok=True)
    remove_cached(version_ids)  # exports built from those weights (learner.model_export) go with them
