"""Agreement reports, batch consensus, and label export/import (CSV, JSON, QuPath GeoJSON)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from django.db import transaction

from . import voting
from .domain.agreement import annotator_reliability, expert_labels, project_agreement
from .domain.consensus import VoteRecord, batch_consensus
from .models import Consensus, LabelClass, Patch, Project, Role, Slide, Vote

EXPERT_ROLES = (Role.EXPERT, Role.ADMIN)


class ImportError_(Exception):
    """A label file that cannot be imported; the message says what to fix."""


def label_names(project: Project) -> list[str]:
    return list(LabelClass.objects.filter(project=project).order_by("order").values_list("name", flat=True))


def vote_records(project: Project) -> list[VoteRecord]:
    rows = Vote.objects.filter(project=project, is_active=True).values_list(
        "patch_id", "annotator_id", "label__name", "role"
    )
    return [VoteRecord(item=p, annotator=a, label=lbl, role=r) for p, a, lbl, r in rows]


def gold_labels(project: Project) -> dict[int, str]:
    """Gold patches' expert labels (the expert decision on each gold patch)."""
    records = vote_records(project)
    experts = expert_labels(records, label_names(project))
    gold_ids = set(Patch.objects.filter(project=project, is_gold=True).values_list("pk", flat=True))
    return {int(item): label for item, label in experts.items() if item in gold_ids}


def recompute_project_consensus(project: Project) -> int:
    """Batch consensus with the project's method (the iterative ones run here), seeded with gold.

    Returns the number of consensus rows written.
    """
    records = vote_records(project)
    if not records:
        return 0
    labels = label_names(project)
    results = batch_consensus(
        records, labels, **voting.consensus_options(project), gold=gold_labels(project), seed=project.seed
    )
    by_name = {lc.name: lc for lc in LabelClass.objects.filter(project=project)}
    existing = {c.patch_id: c for c in Consensus.objects.filter(project=project, patch_id__in=list(results))}
    create, update = [], []
    for item, result in results.items():
        row = existing.get(int(item)) or Consensus(patch_id=int(item), project=project)
        for field, value in voting.consensus_fields(result, by_name.get(result.label or "")).items():
            setattr(row, field, value)
        (update if row.pk else create).append(row)
    with transaction.atomic():
        Consensus.objects.bulk_create(create, batch_size=1000)
        Consensus.objects.bulk_update(
            update, ["label", "confidence", "posterior", "method", "vote_count", "agreement", "status"], batch_size=1000
        )
    return len(results)


def agreement_report(project: Project) -> dict[str, Any]:
    """Fleiss' kappa / Krippendorff's alpha (statsmodels, krippendorff) and per-annotator reliability
    (scikit-learn Cohen's kappa, crowd-kit Dawid-Skene confusion)."""
    from django.contrib.auth import get_user_model

    records = vote_records(project)
    labels = label_names(project)
    if not records:
        return {"overall": None, "per_class": {}, "annotators": [], "labels": labels}
    agreement = project_agreement(records, labels, roles={Role.CROWD})
    reliability = annotator_reliability(records, labels, gold=gold_labels(project))
    users = dict(get_user_model().objects.filter(pk__in=list(reliability)).values_list("pk", "username"))
    roles = dict(Vote.objects.filter(project=project, is_active=True).values_list("annotator_id", "role"))
    return {
        "labels": labels,
        "overall": asdict(agreement.overall),
        "fleiss_kappa": agreement.overall.fleiss_kappa,
        "krippendorff_alpha": agreement.overall.krippendorff_alpha,
        "per_class": {name: asdict(score) for name, score in agreement.per_class.items()},
        "annotators": [
            {
                "username": users.get(int(a), str(a)),
                "role": roles.get(int(a)),
                "n_votes": r.n_votes,
                "cohen_kappa_vs_experts": r.kappa_vs_experts,
                "n_expert_overlap": r.n_expert_overlap,
                "gold_accuracy": r.gold_accuracy,
                "n_gold": r.n_gold,
                "ds_confusion": r.ds_confusion,
            }
            for a, r in sorted(reliability.items(), key=lambda kv: users.get(int(kv[0]), ""))
        ],
    }


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
        raise ImportError_("Each feature needs a Polygon geometry in slide pixel coordinates.") from exc
    return round(min(xs)), round(min(ys)), round(max(max(xs) - min(xs), max(ys) - min(ys)))


def parse_labels(content: bytes, filename: str, default_slide: str | None = None) -> list[tuple[str, int, int, str]]:
    """(slide name, x, y, label) rows from a QuPath GeoJSON or a CSV with slide,x,y,label columns."""
    text = content.decode("utf-8-sig", errors="strict")
    rows: list[tuple[str, int, int, str]] = []
    if filename.lower().endswith((".geojson", ".json")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ImportError_(f"{filename} is not valid JSON: {exc}.") from exc
        features = data.get("features") if isinstance(data, dict) else data
        if not isinstance(features, list):
            raise ImportError_("Expected a GeoJSON FeatureCollection (or a list of features).")
        for feature in features:
            props = feature.get("properties") or {}
            name = (props.get("classification") or {}).get("name")
            slide = (props.get("histoloop") or {}).get("slide") or props.get("slide") or default_slide
            if not name or not slide:
                raise ImportError_("Every feature needs properties.classification.name and a slide name.")
            x, y, _ = _square(feature.get("geometry") or {})
            rows.append((slide, x, y, name))
    elif filename.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        missing = {"x", "y", "label"} - set(reader.fieldnames or [])
        if missing or ("slide" not in (reader.fieldnames or []) and not default_slide):
            raise ImportError_("The CSV needs columns slide, x, y and label.")
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
                raise ImportError_(f"Row {reader.line_num}: x and y must be numbers.") from exc
    else:
        raise ImportError_("Upload a .geojson, .json or .csv file.")
    if not rows:
        raise ImportError_("The file holds no labels.")
    return rows


def import_expert_labels(
    project: Project, user: Any, role: str, rows: list[tuple[str, int, int, str]]
) -> dict[str, int]:
    """Record each row as the importing expert's vote on the matching patch; all or nothing."""
    if role not in EXPERT_ROLES:
        raise ImportError_("Only experts and admins can import expert labels.")
    names = set(label_names(project))
    unknown = sorted({label for *_, label in rows if label not in names})
    if unknown:
        raise ImportError_(f"Unknown labels {unknown}; the project's labels are {sorted(names)}.")
    slides = {s.name: s.pk for s in Slide.objects.filter(project=project)}
    missing_slides = sorted({slide for slide, *_ in rows if slide not in slides})
    if missing_slides:
        raise ImportError_(f"No slides named {missing_slides} in this project.")
    patches = {
        (slide_id, x, y): pk
        for pk, slide_id, x, y in Patch.objects.filter(project=project).values_list("pk", "slide_id", "x", "y")
    }
    resolved = []
    for slide, x, y, label in rows:
        pk = patches.get((slides[slide], x, y))
        if pk is None:
            raise ImportError_(f"No patch at ({x}, {y}) on slide {slide}; labels must match the patch grid.")
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
