"""Small real projects built from LC25000 lung patches (each image is a one-patch slide)."""

from __future__ import annotations

import csv
from pathlib import Path

from annotations.models import Project, Slide
from annotations.slides import ingest
from tests.conftest import LC25000_DIR

CLASS_NAMES = {"lung_aca": "adenocarcinoma", "lung_n": "benign", "lung_scc": "squamous"}


def manifest_rows(per_class: int, groups_per_class: int) -> list[dict[str, str]]:
    """``per_class`` images of each class from ``groups_per_class`` different groups, deterministic."""
    with (LC25000_DIR / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    chosen: list[dict[str, str]] = []
    for folder in CLASS_NAMES:
        by_group: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            if row["label"] == folder or row["path"].split("/")[-2] == folder:
                by_group.setdefault(row["group_id"], []).append(row)
        groups = sorted(by_group)[:groups_per_class]
        i = 0
        while len([r for r in chosen if r.get("_class") == folder]) < per_class:
            group = groups[i % len(groups)]
            pick = by_group[group][i // len(groups)]
            chosen.append({**pick, "_class": folder})
            i += 1
    return chosen


def image_path(row: dict[str, str]) -> Path:
    path = Path(row["path"])
    return path if path.is_absolute() else LC25000_DIR / path


def add_lc25000_slides(project: Project, rows: list[dict[str, str]]) -> list[Slide]:
    """Add and ingest (in this process) one slide per image; returns the ready slides."""
    out = []
    for row in rows:
        slide = ingest.add_slide_from_path(project, image_path(row), group=row["group_id"], launch=False)
        ingest.ingest(slide.pk)
        slide.refresh_from_db()
        assert slide.status == Slide.Status.READY, slide.error
        out.append(slide)
    return out
