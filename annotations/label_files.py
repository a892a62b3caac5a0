"""Label files out and in: votes and consensus as CSV, JSON or QuPath GeoJSON; expert labels imported
from a CSV or GeoJSON as the importer's votes, all or nothing."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from typing import Any

from django.db import transaction
from geojson_pydantic import Feature, FeatureCollection
from pydantic import ValidationError

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
    "provenance",
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
            "provenance": v.provenance,
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


# Slide pixel coordinates: patch positions are PostgreSQL integers, so nothing larger can match.
MAX_COORDINATE = 2**31 - 1


def _coordinate(value: Any) -> float:
    """A finite number in slide pixels (JSON booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_COORDINATE:
        raise ValueError(value)
    return number


def _square(geometry: Any) -> tuple[int, int, int]:
    try:
        ring = geometry["coordinates"][0]
        xs = [_coordinate(p[0]) for p in ring]
        ys = [_coordinate(p[1]) for p in ring]
        if not xs:
            raise ValueError("empty ring")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise LabelFileError(
            "Each feature needs a Polygon geometry in slide pixel coordinates (finite numbers)."
        ) from exc
    return round(min(xs)), round(min(ys)), round(max(max(xs) - min(xs), max(ys) - min(ys)))


def _object(value: Any) -> dict[str, Any]:
    """A JSON object, or {} for a missing one; LabelFileError for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LabelFileError("Feature properties, classification and histoloop must be JSON objects.")
    return value


def geojson_features(data: Any) -> list[Any]:
    """The features of a FeatureCollection, a list of Features or one Feature (the shapes QuPath
    writes), checked against the GeoJSON schema (geojson-pydantic); LabelFileError naming the first
    problems otherwise."""
    try:
        if isinstance(data, list):
            return [Feature.model_validate(item) for item in data]
        if isinstance(data, dict) and data.get("type") == "Feature":
            return [Feature.model_validate(data)]
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            return list(FeatureCollection.model_validate(data).features)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()[:3])
        raise LabelFileError(f"The file is not valid GeoJSON ({exc.error_count()} problems): {problems}.") from exc
    raise LabelFileError("Expected a GeoJSON FeatureCollection, a Feature or a list of Features (as QuPath exports).")


def _geojson_rows(text: str, filename: str, default_slide: str | None) -> list[tuple[str, int, int, str]]:
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise LabelFileError(f"{filename} is nested too deeply to be GeoJSON.") from exc
    except ValueError as exc:
        raise LabelFileError(f"{filename} is not valid JSON: {exc}.") from exc
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise LabelFileError("Expected a GeoJSON FeatureCollection (or a list of features).")
    rows = []
    for number, feature in enumerate(features, 1):
        if not isinstance(feature, dict):
            raise LabelFileError(f"Feature {number} is not a GeoJSON Feature object.")
        props = _object(feature.get("properties"))
        name = _object(props.get("classification")).get("name")
        slide = _object(props.get("histoloop")).get("slide") or props.get("slide") or default_slide
        if not (isinstance(name, str) and name and isinstance(slide, str) and slide):
            raise LabelFileError(f"Feature {number} needs properties.classification.name and a slide name, both text.")
        x, y, _ = _square(feature.get("geometry"))
        rows.append((slide, x, y, name))
    geojson_features(data)  # the specific problems above first, with their own messages; then the schema
    return rows


def _csv_rows(text: str, default_slide: str | None) -> list[tuple[str, int, int, str]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = {"x", "y", "label"} - set(reader.fieldnames or [])
    if missing or ("slide" not in (reader.fieldnames or []) and not default_slide):
        raise LabelFileError("The CSV needs columns slide, x, y and label.")
    rows = []
    for line in reader:
        try:
            x, y = int(_coordinate(line["x"])), int(_coordinate(line["y"]))
        except (TypeError, ValueError) as exc:
            raise LabelFileError(f"Row {reader.line_num}: x and y must be finite numbers.") from exc
        label = (line.get("label") or "").strip()
        slide = line.get("slide") or default_slide or ""
        if not label or not slide:
            raise LabelFileError(f"Row {reader.line_num}: every row needs a slide and a label.")
        rows.append((slide, x, y, label))
    return rows


def parse_labels(content: bytes, filename: str, default_slide: str | None = None) -> list[tuple[str, int, int, str]]:
    """(slide name, x, y, label) rows from a QuPath GeoJSON or a CSV with slide,x,y,label columns."""
    text = content.decode("utf-8-sig", errors="strict")
    if filename.lower().endswith((".geojson", ".json")):
        rows = _geojson_rows(text, filename, default_slide)
    elif filename.lower().endswith(".csv"):
        rows = _csv_rows(text, default_slide)
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
    return record_expert_votes(project, user, role, resolved, Vote.Provenance.LABEL_IMPORT)


def record_expert_votes(
    project: Project, user: Any, role: str, resolved: Iterable[tuple[int, str]], provenance: str
) -> dict[str, int]:
    """(patch id, label name) pairs as the user's votes through the normal vote path, in one transaction.

    A patch the user already gave that label is left alone; another label corrects their vote (the
    old one stays, inactive). The caller has checked the patches and labels belong to the project.
    """
    created = skipped = 0
    with transaction.atomic():
        for pk, label in resolved:
            existing = Vote.objects.filter(patch_id=pk, annotator=user, is_active=True).select_related("label").first()
            if existing is not None and existing.label.name == label:
                skipped += 1
                continue
            if existing is not None:
                voting.correct_vote(project, user, role, vote_id=existing.pk, label=label, provenance=provenance)
            else:
                voting.cast_vote(project, user, role, patch_id=pk, label=label, provenance=provenance)
            created += 1
    return {"imported": created, "unchanged": skipped}
