from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotations.models import Project
from learner.retention import prune_model_versions


class Command(BaseCommand):
    help = (
        "Delete the weights files and per-slide scores of old model versions, keeping each project's N newest. "
        "The ModelVersion rows stay: which labels trained which model, and its metrics."
    )

    def add_arguments(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--keep", type=int, default=3, help="Newest versions kept whole per project (default 3).")
        parser.add_argument("--project", help="Only this project (id or exact name).")
        parser.add_argument("--dry-run", action="store_true", help="Say what would be deleted, delete nothing.")

    def handle(self, *args: object, keep: int, project: str | None, dry_run: bool, **options: object) -> None:
        if keep < 1:
            raise CommandError("--keep must be at least 1: the newest model serves the heatmap and predictions.")
        project_id = None
        if project is not None:
            query = (
                Project.objects.filter(pk=int(project)) if project.isdigit() else Project.objects.filter(name=project)
            )
            found = query.first()
            if found is None:
                raise CommandError(f"No project {project!r}. Use its id or exact name.")
            project_id = found.pk
        report = prune_model_versions(keep, project_id=project_id, dry_run=dry_run)
        verb = "Would prune" if dry_run else "Pruned"
        self.stdout.write(
            f"{verb} {len(report.versions)} model versions: {len(report.files)} weights files, "
            f"{report.score_rows} score rows; their ModelVersion rows are kept."
        )
