"""A model version exported for programs outside the platform: a WSInfer model (``config.json`` +
``torchscript_model.pt``, which ``wsinfer run`` and QuPath's WSInfer extension load) or ONNX, as a zip.

The network files come from ``learner.core.export``; this module decides what may be exported, the
patch geometry a client must cut (``spacing_um_px``), and caches the built files, since tracing a
backbone takes seconds: under ``<LEARNER_CACHE_DIR>/exports/<version id>/<format>-<weights digest>/``,
built under an advisory lock (two requests build once) into a temporary folder that is renamed whole.

Geometry. The platform cuts patches by objective power: a patch is ``patch_size`` pixels at the project's
magnification, ``patch_size * slide magnification / project magnification`` level-0 pixels of a slide.
WSInfer cuts by physical size: ``patch_size_pixels * spacing_um_px / slide mpp`` level-0 pixels. The two
agree on a slide when ``spacing_um_px = slide mpp * slide magnification / project magnification``; scanners
keep ``mpp * magnification`` near 10 µm (0.25 µm/px at 40x, 0.5 at 20x), so the export takes the median
of that product over the project's slides that state both (10 when none does).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotations.models import Project, Slide
from annotations.zip_stream import ZipStream

from .conf import learner_settings
from .locks import held, lock_key
from .models import ModelVersion, TrainingRound

if TYPE_CHECKING:
    from .core.classifier import Classifier

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("wsinfer", "onnx")
# Bumped when the files an export holds change, so a cached export of an older layout is rebuilt.
EXPORT_LAYOUT = 1
# µm per pixel times objective power when no slide of the project states both (0.5 µm/px at 20x).
DEFAULT_MPP_TIMES_MAGNIFICATION = 10.0
CHUNK = 1 << 20


class ExportError(Exception):
    """Why a model version cannot be exported, with the HTTP status that says so."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Export:
    """A built export: its files (name in the zip -> their bytes, or their path on disk), in zip order."""

    version: ModelVersion
    fmt: str
    folder_name: str
    files: dict[str, bytes | Path]
    config: dict[str, Any]

    @property
    def filename(self) -> str:
        return f"{self.folder_name}-{self.fmt}.zip"


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.", 400)


def find_version(project: Project, version_id: int) -> ModelVersion:
    version = ModelVersion.objects.filter(project=project, pk=version_id).select_related("round").first()
    if version is None:
        raise ExportError("No such model version in this project.", 404)
    return version


def check_exportable(version: ModelVersion) -> None:
    """A version is exported only once its round has succeeded and while its weights file is kept."""
    round_ = version.round
    if round_.state != TrainingRound.State.SUCCEEDED:
        detail = f": {round_.error}" if round_.error else ""
        raise ExportError(
            f"Round {round_.number} {'is still ' if round_.state in TrainingRound.ACTIVE_STATES else ''}"
            f"{round_.state}{detail}. Only a model of a round that succeeded can be exported.",
            409,
        )
    if version.pruned_at is not None:
        raise ExportError(
            "This model version was pruned (its weights were deleted by prune_models); export a newer one.", 410
        )
    if not version.weights_path or not Path(version.weights_path).is_file():
        raise ExportError("The weights file of this model version is missing from storage; retrain it.", 410)


def spacing_um_px(project: Project) -> float:
    """The µm per pixel of a patch at the project's magnification (see the module docstring)."""
    products = [
        mpp * mag
        for mpp, mag in Slide.objects.filter(
            project=project, status=Slide.Status.READY, mpp__gt=0, magnification__gt=0
        ).values_list("mpp", "magnification")
    ]
    product = statistics.median(products) if products else DEFAULT_MPP_TIMES_MAGNIFICATION
    return round(product / float(project.magnification), 6)


def _folder_name(version: ModelVersion) -> str:
    return f"histoloop-project-{version.project_id}-round-{version.round.number}"


def exports_dir() -> Path:
    return learner_settings().CACHE_DIR / "exports"


def build(version: ModelVersion, fmt: str) -> Export:
    """The version's export in ``fmt`` (checks first: see ``check_exportable``). The network file is built
    once and cached; ``config.json`` is written afresh from the project each time (it is small, and its
    spacing follows the project's slides)."""
    from .core import export
    from .core.backbone import weights_digest
    from .core.classifier import load_model
    from .core.errors import LearnerError

    check_format(fmt)
    check_exportable(version)
    project = version.project
    weights = Path(version.weights_path)
    network = export.TORCHSCRIPT_NAME if fmt == "wsinfer" else export.ONNX_NAME
    folder = exports_dir() / str(version.pk) / f"{fmt}-{EXPORT_LAYOUT}-{weights_digest(weights)}"
    try:
        classifier = load_model(weights)
        description = (
            f"Histoloop project '{project.name}', round {version.round.number} "
            f"({version.backbone}, {version.train_mode} mode, {version.n_labels} labels)."
        )
        config = _config(classifier, project, description)
        with held(lock_key("model-export", version.pk, fmt)):
            if not (folder / network).is_file():
                for stale in folder.parent.glob(f"{fmt}-*"):  # other weights once under this id (a rebuilt database)
                    shutil.rmtree(stale, ignore_errors=True)
                folder.mkdir(parents=True, exist_ok=True)
                save = export.save_torchscript if fmt == "wsinfer" else export.save_onnx
                diff = save(classifier, folder / network)  # written atomically: a file there is whole
                logger.info("Exported model version %s as %s (max difference from torch %.2g)", version.pk, fmt, diff)
    except LearnerError as exc:
        raise ExportError(f"The model could not be exported: {exc}", 409) from exc
    files: dict[str, bytes | Path] = {export.CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}
    files[network] = folder / network
    return Export(version, fmt, _folder_name(version), files, config)


def _config(classifier: Classifier, project: Project, description: str) -> dict[str, Any]:
    from .core.export import wsinfer_config

    return wsinfer_config(
        classifier,
        patch_size_pixels=int(project.patch_size),
        spacing_um_px=spacing_um_px(project),
        description=description,
    )


def stream(export: Export) -> Iterator[bytes]:
    """The export as a zip, read from disk a chunk at a time: one folder named for the model, holding the
    files (the layout QuPath's WSInfer extension expects of a local model directory)."""
    archive = ZipStream()
    for name, content in export.files.items():
        if isinstance(content, bytes):
            yield archive.add(f"{export.folder_name}/{name}", content, compress=True)
            continue
        entry = archive.open(f"{export.folder_name}/{name}", compress=False)
        with content.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(CHUNK), b""):  # type: ignore[misc]
                entry.write(block)
                if data := archive.take():
                    yield data
        entry.close()
        if data := archive.take():
            yield data
    yield archive.close()


def remove_cached(version_ids: list[int]) -> None:
    """Delete the cached exports of these versions (their weights were pruned)."""
    for pk in version_ids:
        shutil.rmtree(exports_dir() / str(pk), ignore_errors=True)
