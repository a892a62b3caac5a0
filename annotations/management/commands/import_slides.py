"""``manage.py import_slides PROJECT DIR``: add every slide file in a directory under SLIDE_IMPORT_ROOT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotations.models import Project, Slide
from annotations.slides import ingest


def find_project(value: str) -> Project:
    project = Project.objects.filter(pk=int(value)).first() if value.isdigit() else None
    project = project or Project.objects.filter(name=value).first()
    if project is None:
        raise CommandError(f"No project has the id or name '{value}'.")
    return project


def resolve_inside(root: Path, value: str) -> Path:
    """The directory (or file) ``value`` names, relative to ``root`` or absolute; refused outside ``root``."""
    root = root.resolve()
    candidate = Path(value).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise CommandError(f"'{value}' is outside the import directory {root}; put the slides under it.")
    if not resolved.exists():
        raise CommandError(f"'{value}' does not exist under the import directory {root}.")
    return resolved


class Command(BaseCommand):
    help = (
        "Add the slide files in DIR (relative to SLIDE_IMPORT_ROOT, or an absolute path inside it) to PROJECT "
        "(an id or name). Each slide is queued for processing on the cpu worker, or processed here with --now."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="Project id or name.")
        parser.add_argument("directory", help="Directory (or single file) under SLIDE_IMPORT_ROOT.")
        parser.add_argument("--group", default="", help="Patient/case group recorded on every slide.")
        parser.add_argument(
            "--now", action="store_true", help="Process each slide in this process instead of queueing it."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        project = find_project(options["project"])
        root = Path(settings.SLIDE_IMPORT_ROOT)
        target = resolve_inside(root, options["directory"])
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if not p.name.startswith("."))
        files = [p for p in files if not p.is_dir()]
        if not files:
            raise CommandError(f"'{options['directory']}' has no files to import.")

        added = 0
        refused = 0
        for path in files:
            try:
                if not path.resolve().is_relative_to(root.resolve()):
                    raise ingest.SlideRejected(f"'{path.name}' links outside the import directory; it was skipped.")
                slide = ingest.add_slide_from_path(project, path, group=options["group"], launch=not options["now"])
            except ingest.SlideRejected as exc:
                refused += 1
                self.stderr.write(f"Refused {path.name}: {exc.message}")
                continue
            if options["now"]:
                slide = ingest.ingest(slide.pk) or slide
                self._report(slide)
                if slide.status == Slide.Status.FAILED:
                    refused += 1
                    continue
            else:
                self.stdout.write(f"Added {slide.name} as slide {slide.pk}; queued for processing.")
            added += 1

        summary = f"{added} slide(s) added to '{project.name}', {refused} file(s) refused."
        if refused:
            raise CommandError(summary)
        self.stdout.write(self.style.SUCCESS(summary))

    def _report(self, slide: Slide) -> None:
        if slide.status == Slide.Status.FAILED:
            self.stderr.write(f"Slide {slide.pk} ({slide.name}) failed: {slide.error}")
            return
        line = f"Added {slide.name} as slide {slide.pk}: {slide.width}x{slide.height}, {slide.patches.count()} patches."
        self.stdout.write(line + (f" {slide.message}" if slide.message else ""))
