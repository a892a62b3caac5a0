from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotations.models import Project
from learner import services


class Command(BaseCommand):
    help = "Queue a training round for a project (by id or name) on the gpu queue."

    def add_arguments(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="Project id or exact name.")
        parser.add_argument("--wait", action="store_true", help="Run the round in this process instead of a worker.")

    def handle(self, *args: object, project: str, wait: bool, **options: object) -> None:
        query = Project.objects.filter(pk=int(project)) if project.isdigit() else Project.objects.filter(name=project)
        found = query.first()
        if found is None:
            raise CommandError(f"No project {project!r}. Use its id or exact name.")
        try:
            round_ = services.start_round(found, launch=not wait)
        except services.RoundConflict as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Round {round_.number} of {found.name} queued (id {round_.pk}).")
        if wait:
            from learner.pipeline import run_round

            round_ = run_round(round_.pk)
            self.stdout.write(f"Round {round_.number} {round_.state}. {round_.error}".strip())
