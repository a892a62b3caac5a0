"""``manage.py export_training_set PROJECT OUT.zip``: the labelled patches as a zip ``simulate`` reads."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotations import training_set
from annotations.management.commands.import_slides import find_project


class Command(BaseCommand):
    help = (
        "Write PROJECT's labelled patches (an id or name) as OUT (a .zip path, or - for standard output): "
        "CLASS/GROUP/PATCH.png plus manifest.csv with each patch's consensus, posterior, votes and provenance."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="Project id or name.")
        parser.add_argument("out", help="The zip to write, or - for standard output.")
        parser.add_argument(
            "--status",
            default=",".join(training_set.FINAL_STATUSES),
            help=f"Comma-separated consensus statuses (default: agreed,expert); any of {training_set.STATUSES}.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        project = find_project(options["project"])
        statuses = [s.strip() for s in options["status"].split(",") if s.strip()]
        try:
            training_set.check_statuses(statuses)
        except training_set.TrainingSetError as exc:
            raise CommandError(str(exc)) from exc
        total = training_set.count(project, statuses)
        started = time.monotonic()
        written = 0
        if options["out"] == "-":
            sink = sys.stdout.buffer
            for chunk in training_set.stream(project, statuses):
                sink.write(chunk)
                written += len(chunk)
            sink.flush()
            return
        out = Path(options["out"])
        partial = out.with_name(out.name + ".partial")
        try:
            with partial.open("wb") as sink:
                for chunk in training_set.stream(project, statuses):
                    sink.write(chunk)
                    written += len(chunk)
            os.replace(partial, out)  # a half-written archive never carries the final name
        finally:
            partial.unlink(missing_ok=True)
        self.stdout.write(
            f"Wrote {total} patches ({written / 1e6:.1f} MB) to {out} in {time.monotonic() - started:.1f}s."
        )
