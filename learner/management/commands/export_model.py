"""``manage.py export_model PROJECT OUT``: a model version as a WSInfer model or ONNX (learner.model_export)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotations.management.commands.import_slides import find_project
from learner import model_export
from learner.models import ModelVersion, TrainingRound


class Command(BaseCommand):
    help = (
        "Export a model version of PROJECT (an id or name) to OUT: a .zip path writes the archive the API serves; "
        "any other path is a folder that receives the model's own folder (config.json + torchscript_model.pt for "
        "WSInfer, model.onnx for ONNX), ready for QuPath's WSInfer extension or `wsinfer run`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="Project id or name.")
        parser.add_argument("out", help="A .zip to write, or a folder to put the model folder in.")
        parser.add_argument("--format", default="wsinfer", help=f"One of {', '.join(model_export.FORMATS)}.")
        which = parser.add_mutually_exclusive_group()
        which.add_argument(
            "--model-version", dest="version_id", type=int, help="Model version id (default: the newest)."
        )
        which.add_argument("--round", dest="round_number", type=int, help="The round number whose model to export.")

    def handle(self, *args: Any, **options: Any) -> None:
        project = find_project(options["project"])
        try:
            model_export.check_format(options["format"])
            version = self._version(project, options["version_id"], options["round_number"])
            built = model_export.build(version, options["format"])
        except model_export.ExportError as exc:
            raise CommandError(str(exc)) from exc
        out = Path(options["out"])
        if out.suffix.lower() == ".zip":
            partial = out.with_name(out.name + ".partial")
            try:
                with partial.open("wb") as sink:
                    for chunk in model_export.stream(built):
                        sink.write(chunk)
                os.replace(partial, out)  # a half-written archive never carries the final name
            finally:
                partial.unlink(missing_ok=True)
            written = out
        else:
            written = out / built.folder_name
            staging = out / f".{built.folder_name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                for name, content in built.files.items():
                    if isinstance(content, bytes):
                        (staging / name).write_bytes(content)
                    else:
                        shutil.copyfile(content, staging / name)
                shutil.rmtree(written, ignore_errors=True)
                staging.rename(written)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self.stdout.write(
            f"Exported model version {version.pk} (round {version.round.number}) as {built.fmt} to {written}."
        )

    def _version(self, project: Any, version_id: int | None, round_number: int | None) -> ModelVersion:
        if version_id is not None:
            return model_export.find_version(project, version_id)
        versions = ModelVersion.objects.filter(project=project).select_related("round")
        if round_number is not None:
            version = versions.filter(round__number=round_number).first()
            if version is None:
                raise model_export.ExportError(f"Round {round_number} of this project made no model version.", 404)
            return version
        version = versions.filter(round__state=TrainingRound.State.SUCCEEDED).order_by("-created_at").first()
        if version is None:
            raise model_export.ExportError("No round of this project has succeeded yet; run one first.", 404)
        return version
