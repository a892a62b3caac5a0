"""Label files out and in: votes and consensus as CSV, JSON or QuPath GeoJSON; expert labels imported
from a CSV or GeoJSON as the importer's votes, all or nothing."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from django.db import transaction

from . import voting
from .consensus import label_names
from .models import Consensus, Patch, Project, Role, Slide, Vote

EXPERT_ROLES = (Role.EXPERT, Role.ADMIN)


class LabelFileError(Exception):
    """A label file that cannot be imported; the message says what to fix."""


# --- export -----------------------------------------------------------------------------------------

VOTE_FIELDS = [
    "vote_id",
    "patch_id",
    "slide",
    "x",
    "y",
    "size",
    "annotator",
    "role",
    "label",
    "time_spent_ms",
    "is_active",
    "supersedes",
    "retracted_at",
    "created_at",
]
CONSENSUS_FIELDS = [
    "patch_id",
    "slide",
    "x",
    "y",
    "size",
    "label",
    "confidence",
    "status",
    "method",
    "vote_count",
    "agreement",
    "is_gold",
]


def vote_rows(project: Project) -> Iterable[dict[str, Any]]:
    votes = Vote.objects.filter(project=project).select_related("patch__slide", "annotator", "label").order_by("id")
    for v in votes.iterator(chunk_size=2000):
        yield {
            "vote_id": v.pk,
            "patch_id": v.patch_id,
            "slide": v.patch.slide.name,
            "x": v.patch.x,
            "y": v.patch.y,
            "size": v.patch.size,
            "annotator": v.annotator.username,
            "role": v.role,
            "label": v.label.name,
            "time_spent_ms": v.time_spent_ms,
            "is_active": v.is_active,
            "supersedes": v.supersedes_id,
            "retracted_at": v.retracted_at.isoformat() if v.retracted_at else None,
            "created_at": v.created_at.isoformat(),
        }


def consensus_rows(project: Project, slide_id: int | None = None) -> Iterable[dict[str, Any]]:
    rows = Consensus.objects.filter(project=project, label__isnull=False).select_related("patch__slide", "label")
    if slide_id is not None:
        rows = rows.filter(patch__slide_id=slide_id)
    for c in rows.order_by("patch_id").iterator(chunk_size=2000):
        yield {
            "patch_id": c.patch_id,
            "slide": c.patch.slide.name,
            "x": c.patch.x,
            "y": c.patch.y,
            "size": c.patch.size,
            "label": c.label.name if c.label else None,
            "colour": c.label.colour if c.label else None,
            "confidence": round(c.confidence, 4),
            "status": c.status,
            "method": c.method,
            "vote_count": c.vote_count,
            "agreement": round(c.agreement, 4),
            "is_gold": c.patch.is_gold,
        }


def to_csv(rows: Iterable[dict[str, Any]], fields: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def _rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def to_geojson(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A FeatureCollection QuPath imports: one square per patch in level-0 slide pixels, classified."""
    features = []
    for row in rows:
        x, y, s = row["x"], row["y"], row["size"]
        features.append(
            {
                "type": "Feature",
                "id": f"patch-{row['patch_id']}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": row["label"], "color": _rgb(row["colour"] or "#808080")},
                    "isLocked": False,
                    "histoloop": {k: row[k] for k in ("patch_id", "slide", "status", "confidence", "vote_count")},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


# --- import -----------------------------------------------------------------------------------------


def _square(geometry: dict[str, Any]) -> tuple[int, int, int]:
    try:
        ring = geometry["coordinates"][0]
        xs = [float(p[0]) for p in ring]
        ys = [float(p[1]) for p in ring]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise LabelFileError("Each feature needs a Polygon geometry in slide pixel coordinates.") from exc
    return round(min(xs)), round(min(ys)), round(max(max(xs) - min(xs), max(ys) - min(ys)))


def parse_labels(content: bytes, filename: str, default_slide: str | None = None) -> list[tuple[str, int, int, str]]:
    """(slide name, x, y, label) rows from a QuPath GeoJSON or a CSV with slide,x,y,label columns."""
    text = content.decode("utf-8-sig", errors="strict")
    rows: list[tuple[str, int, int, str]] = []
    if filename.lower().endswith((".geojson", ".json")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LabelFileError(f"{filename} is not valid JSON: {exc}.") from exc
        features = data.get("features") if isinstance(data, dict) else data
        if not isinstance(features, list):
            raise LabelFileError("Expected a GeoJSON FeatureCollection (or a list of features).")
        for feature in features:
            props = feature.get("properties") or {}
            name = (props.get("classification") or {}).get("name")
            slide = (props.get("histoloop") or {}).get("slide") or props.get("slide") or default_slide
            if not name or not slide:
                raise LabelFileError("Every feature needs properties.classification.name and a slide name.")
            x, y, _ = _square(feature.get("geometry") or {})
            rows.append((slide, x, y, name))
    elif filename.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        missing = {"x", "y", "label"} - set(reader.fieldnames or [])
        if missing or ("slide" not in (reader.fieldnames or []) and not default_slide):
            raise LabelFileError("The CSV needs columns slide, x, y and label.")
        for line in reader:
            try:
                rows.append(
                    (
                        line.get("slide") or default_slide or "",
                        int(float(line["x"])),
                        int(float(line["y"])),
                        line["label"],
                    )
                )
            except (TypeError, ValueError) as exc:
                raise LabelFileError(f"Row {reader.line_num}: x and y must be numbers.") from exc
    else:
        raise LabelFileError("Upload a .geojson, .json or .csv file.")
    if not rows:
        raise LabelFileError("The file holds no labels.")
    return rows


def import_expert_labels(
    project: Project, user: Any, role: str, rows: list[tuple[str, int, int, str]]
) -> dict[str, int]:
    """Record each row as the importing expert's vote on the matching patch; all or nothing."""
    if role not in EXPERT_ROLES:
        raise LabelFileError("Only experts and admins can import expert labels.")
    names = set(label_names(project))
    unknown = sorted({label for *_, label in rows if label not in names})
    if unknown:
        raise LabelFileError(f"Unknown labels {unknown}; the project's labels are {sorted(names)}.")
    slides = {s.name: s.pk for s in Slide.objects.filter(project=project)}
    missing_slides = sorted({slide for slide, *_ in rows if slide not in slides})
    if missing_slides:
        raise LabelFileError(f"No slides named {missing_slides} in this project.")
    patches = {
        (slide_id, x, y): pk
        for pk, slide_id, x, y in Patch.objects.filter(project=project).values_list("pk", "slide_id", "x", "y")
    }
    resolved = []
    for slide, x, y, label in rows:
        pk = patches.get((slides[slide], x, y))
        if pk is None:
            raise LabelFileError(f"No patch at ({x}, {y}) on slide {slide}; labels must match the patch grid.")
        resolved.append((pk, label))
    created = skipped = 0
    with transaction.atomic():
        for pk, label in resolved:
            existing = Vote.objects.filter(patch_id=pk, annotator=user, is_active=True).first()
            if existing is not None and existing.label.name == label:
                skipped += 1
                continue
            if existing is not None:
                voting.correct_vote(project, user, role, vote_id=existing.pk, label=label)
            else:
                voting.cast_vote(project, user, role, patch_id=pk, label=label)
            created += 1
    return {"imported": created, "unchanged": skipped}
