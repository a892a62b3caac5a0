"""The source project: every image of the set ingested once (one slide with one patch per image) through
the platform's own slide ingest, with the images' true labels and groups, and their embeddings made by the
round's own embed step (so every run's rounds read them from the cache)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.db import transaction
from PIL import Image

from annotations.models import LabelClass, Patch, Project, Slide
from annotations.slides import ingest as slides
from learner import embedding
from learner.conf import learner_settings
from learner.core.backbone import Backbone

from .errors import SimulationError
from .items import Item

logger = logging.getLogger(__name__)

COLOURS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
Progress = Callable[[str], None]


@dataclass
class SourceSet:
    """The ingested images, one row per distinct image (byte-identical copies are ingested once)."""

    project: Project
    class_names: list[str]
    patch_ids: np.ndarray
    slide_ids: np.ndarray
    labels: np.ndarray  # true class index
    groups: np.ndarray
    embeddings: np.ndarray | None = None
    backbone: Backbone | None = None  # what made ``embeddings`` (the platform's backbone for the project)

    def __len__(self) -> int:
        return len(self.patch_ids)


def source_project(items: list[Item], name: str, progress: Progress | None = None) -> SourceSet:
    """Create (or resume filling) the source project and return its rows with their true labels."""
    class_names = sorted({i.label for i in items})
    project = Project.objects.filter(name=name).first()
    if project is None:
        project = _create_source(name, class_names, items[0].path)
    have = set(LabelClass.objects.filter(project=project).values_list("name", flat=True))
    if have != set(class_names):
        raise SimulationError(
            f"Project {name!r} exists with classes {sorted(have)}, not {class_names}; use another --source-project."
        )
    done = _ingested_paths(project)
    todo = [i for i in items if str(i.path) not in done]
    started = time.monotonic()
    for n, item in enumerate(todo, 1):
        _ingest_item(project, item)
        if progress and (n % 500 == 0 or n == len(todo)):
            rate = n / max(1e-9, time.monotonic() - started)
            progress(f"ingested {n} of {len(todo)} new images ({rate:.1f}/s)")
    return _load_source(project, class_names, items)


def _create_source(name: str, class_names: list[str], first: Path) -> Project:
    with Image.open(first) as img:
        size = min(img.size)
    if not 32 <= size <= 2048:
        raise SimulationError(f"Images must be 32-2048 px patches; {first.name} is {size} px.")
    with transaction.atomic():
        project = Project.objects.create(
            name=name, description="Simulation source: every image ingested once.", patch_size=size
        )
        for order, cls in enumerate(class_names):
            LabelClass.objects.create(
                project=project, name=cls, colour=COLOURS[order], hotkey=str(order + 1), order=order
            )
    return project


def _ingested_paths(project: Project) -> set[str]:
    done: set[str] = set()
    for meta in Slide.objects.filter(project=project).values_list("metadata", flat=True):
        done.add(meta.get("sim_path", ""))
        done.update(meta.get("sim_aliases", []))
    return done


def _ingest_item(project: Project, item: Item) -> None:
    """Add and ingest one image as a slide with exactly one patch: the image is the patch."""
    try:
        slide = slides.add_slide_from_path(project, item.path, group=item.group, launch=False)
    except slides.SlideRejected as exc:
        if exc.code == "duplicate":
            _record_alias(project, item)
            return
        logger.warning("Skipped %s: %s", item.path, exc.message)
        return
    slides.ingest(slide.pk)
    slide.refresh_from_db()
    if slide.status != Slide.Status.READY:
        logger.warning("Skipped %s: %s", item.path, slide.error)
        return
    edge = min(slide.width or 0, slide.height or 0)
    # Tissue detection may find no patch in a pale image, or several in a large one; a labelled
    # patch set means one patch per image, whatever the detector thinks.
    with transaction.atomic():
        Patch.objects.filter(slide=slide).exclude(x=0, y=0, size=edge).delete()
        Patch.objects.get_or_create(
            slide=slide, x=0, y=0, size=edge, magnification=float(project.magnification), defaults={"project": project}
        )
        Slide.objects.filter(pk=slide.pk).update(metadata={**slide.metadata, "sim_path": str(item.path)})


def _record_alias(project: Project, item: Item) -> None:
    """A byte-identical copy: remember its path on the slide that has the same pixels."""
    checksum = slides.file_sha256(item.path)
    existing = slides.existing_copy(project, checksum)
    if existing is not None:
        meta = existing.metadata
        meta["sim_aliases"] = [*meta.get("sim_aliases", []), str(item.path)]
        Slide.objects.filter(pk=existing.pk).update(metadata=meta)


def _load_source(project: Project, class_names: list[str], items: list[Item]) -> SourceSet:
    truth = {str(i.path): i for i in items}
    rows = Patch.objects.filter(project=project, slide__status=Slide.Status.READY).order_by("id")
    patch_ids, slide_ids, labels, groups = [], [], [], []
    for pid, sid, meta in rows.values_list("id", "slide_id", "slide__metadata"):
        item = truth.get(meta.get("sim_path", ""))
        if item is None:
            continue  # an image of an earlier run that is no longer in the list
        patch_ids.append(pid)
        slide_ids.append(sid)
        labels.append(class_names.index(item.label))
        groups.append(item.group)
    if not patch_ids:
        raise SimulationError(f"No image of the list could be ingested into {project.name!r}; see the log.")
    return SourceSet(
        project=project,
        class_names=class_names,
        patch_ids=np.array(patch_ids),
        slide_ids=np.array(slide_ids),
        labels=np.array(labels),
        groups=np.array(groups),
    )


def source_embeddings(source: SourceSet, progress: Progress | None = None) -> np.ndarray:
    """Every source image's embedding through the round's own code path (so the rounds hit the cache)."""
    cfg = learner_settings()
    by_id = Patch.objects.select_related("slide", "project").in_bulk(list(source.patch_ids))
    patches = [by_id[int(pid)] for pid in source.patch_ids]
    source.backbone = embedding.project_backbone(source.project, cfg)
    last = [time.monotonic()]

    def report(stage: str, fraction: float) -> None:
        if progress and time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            progress(f"embedding source images: {fraction:.0%}")

    source.embeddings = embedding.embed_patches(patches, source.backbone, cfg, progress=report)
    return source.embeddings
