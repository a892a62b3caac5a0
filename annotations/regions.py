"""Region annotations in: QuPath GeoJSON polygons with a classification become expert votes on the
patches they cover.

QuPath exports annotations as a FeatureCollection (or, older versions and single objects, a list of
Features or one Feature), each with a Polygon or MultiPolygon geometry in level-0 pixels, holes as
inner rings, and ``properties.classification = {"name": ..., "color": [r, g, b]}``. Every file is
checked in full before anything is written: GeoJSON schema (geojson-pydantic), finite coordinates
inside the slide, valid polygons (no self-intersection), known class names, a bounded size. Then a
patch covered by at least ``min_coverage`` of its area by the regions of one class gets that class
as the importer's vote through the normal vote path (:func:`label_files.record_expert_votes`),
provenance ``region-import``, all in one transaction.

Coverage is computed per class over the union of its regions (so two touching polygons of one class
count together), with a Shapely STRtree over the slide's patch squares: only patches whose square
meets a region are looked at, the ones wholly inside need no intersection, and the rest get one
vectorised ``intersection``/``area`` pass. Where regions of two classes both cover a patch enough,
the larger share wins (ties: the class listed first in the project).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

from .consensus import label_names
from .label_files import EXPERT_ROLES, LabelFileError, geojson_features, record_expert_votes
from .models import Patch, Project, Slide, Vote

# A QuPath project's annotations of one slide stay far below these; they bound the work a file can ask for.
MAX_FEATURES = 20_000
MAX_VERTICES = 2_000_000
DEFAULT_MIN_COVERAGE = 0.5


class RegionFileError(LabelFileError):
    """A region file that cannot be imported; the message says what to fix. Nothing was written."""


@dataclass(frozen=True)
class Region:
    number: int  # 1-based position in the file, for messages
    label: str
    geometry: Any  # shapely Polygon or MultiPolygon


@dataclass(frozen=True)
class Coverage:
    """Which patches the regions label: patch ids, the label of each, and the share of it covered."""

    patch_ids: np.ndarray
    labels: list[str]
    fractions: np.ndarray
    overlapping: int  # patches covered enough by two classes (the larger share won)


def _name(feature: Any, number: int) -> str:
    props = feature.properties or {}
    object_type = props.get("objectType", "annotation")
    if object_type != "annotation":
        raise RegionFileError(f"Feature {number} is a QuPath {object_type!r}; import annotations (regions) only.")
    classification = props.get("classification")
    name = classification.get("name") if isinstance(classification, dict) else None
    if not (isinstance(name, str) and name):
        raise RegionFileError(
            f"Feature {number} has no classification; give every region a class in QuPath before exporting."
        )
    return name


def parse_regions(content: bytes, slide: Slide, known_labels: list[str]) -> list[Region]:
    """Every region of the file, checked against the schema, the slide and the project's labels."""
    try:
        data = json.loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise RegionFileError("The file is not UTF-8 text.") from exc
    except RecursionError as exc:
        raise RegionFileError("The file is nested too deeply to be GeoJSON.") from exc
    except ValueError as exc:
        raise RegionFileError(f"The file is not valid JSON: {exc}.") from exc
    features = geojson_features(data)
    if not features:
        raise RegionFileError("The file holds no regions.")
    if len(features) > MAX_FEATURES:
        raise RegionFileError(f"The file holds {len(features):,} regions; at most {MAX_FEATURES:,} per import.")
    width, height = slide.width or 0, slide.height or 0
    regions, vertices, unknown = [], 0, set()
    for number, feature in enumerate(features, 1):
        geometry = feature.geometry
        kind = getattr(geometry, "type", None)
        if kind not in ("Polygon", "MultiPolygon"):
            raise RegionFileError(
                f"Feature {number} is a {kind or 'feature without geometry'}; only Polygon and MultiPolygon "
                "regions can label patches."
            )
        name = _name(feature, number)
        if name not in known_labels:
            unknown.add(name)
        polygon = shape(geometry.model_dump(exclude_none=True))
        coords = shapely.get_coordinates(polygon)
        vertices += len(coords)
        if vertices > MAX_VERTICES:
            raise RegionFileError(f"The regions have more than {MAX_VERTICES:,} vertices; simplify them in QuPath.")
        if not np.isfinite(coords).all():
            raise RegionFileError(f"Feature {number} has a coordinate that is not a finite number.")
        low, high = coords.min(axis=0), coords.max(axis=0)
        if low[0] < 0 or low[1] < 0 or high[0] > width or high[1] > height:
            raise RegionFileError(
                f"Feature {number} reaches ({low[0]:.0f}, {low[1]:.0f})-({high[0]:.0f}, {high[1]:.0f}), outside the "
                f"slide {slide.name}, which is {width} x {height} pixels; export it from this slide, in full-"
                "resolution pixel coordinates."
            )
        if not polygon.is_valid:
            raise RegionFileError(
                f"Feature {number} ({name}) is not a valid polygon: {shapely.is_valid_reason(polygon)}. "
                "Redraw or split it in QuPath and export again."
            )
        if polygon.area <= 0:
            raise RegionFileError(f"Feature {number} ({name}) encloses no area.")
        regions.append(Region(number=number, label=name, geometry=polygon))
    if unknown:
        raise RegionFileError(
            f"Unknown classes {sorted(unknown)}; the project's labels are {known_labels}. Rename the classes in "
            "QuPath or add the labels to the project."
        )
    return regions


def coverage(regions: list[Region], slide: Slide, labels: list[str], min_coverage: float) -> Coverage:
    """Patches of ``slide`` covered at least ``min_coverage`` by one class's regions."""
    rows = np.array(Patch.objects.filter(slide=slide).values_list("pk", "x", "y", "size"), dtype=np.int64)
    if len(rows) == 0:
        return Coverage(np.zeros(0, dtype=np.int64), [], np.zeros(0), 0)
    ids, x, y, size = rows.T
    boxes = shapely.box(x, y, x + size, y + size)
    tree = shapely.STRtree(boxes)
    areas = (size * size).astype(float)
    shares = np.zeros((len(labels), len(ids)))
    for index, label in enumerate(labels):
        parts = [r.geometry for r in regions if r.label == label]
        if not parts:
            continue
        union = shapely.union_all(parts)
        shapely.prepare(union)
        candidates = tree.query(union, predicate="intersects")
        inside = shapely.contains_properly(union, boxes[candidates])
        shares[index, candidates[inside]] = 1.0
        edge = candidates[~inside]
        shares[index, edge] = shapely.area(shapely.intersection(boxes[edge], union)) / areas[edge]
    best = shares.argmax(axis=0)  # first maximum: the label listed first wins a tie
    best_share = shares[best, np.arange(len(ids))]
    chosen = best_share >= min_coverage - 1e-9
    overlapping = int(((shares >= min_coverage - 1e-9).sum(axis=0) > 1).sum())
    return Coverage(
        patch_ids=ids[chosen],
        labels=[labels[i] for i in best[chosen]],
        fractions=best_share[chosen],
        overlapping=overlapping,
    )


def import_regions(
    project: Project, user: Any, role: str, slide: Slide, content: bytes, min_coverage: float = DEFAULT_MIN_COVERAGE
) -> dict[str, Any]:
    """Check the whole file, then vote on every covered patch; all or nothing (RegionFileError if bad)."""
    if role not in EXPERT_ROLES:
        raise RegionFileError("Only experts and admins can import regions.")
    if not 0 < min_coverage <= 1:
        raise RegionFileError("min_coverage is the share of a patch a region must cover: above 0, at most 1.")
    if slide.project_id != project.pk or slide.status != Slide.Status.READY or not slide.width or not slide.height:
        raise RegionFileError("Import regions onto a ready slide of this project.")
    labels = label_names(project)
    regions = parse_regions(content, slide, labels)
    covered = coverage(regions, slide, labels, min_coverage)
    pairs = [(int(pid), label) for pid, label in zip(covered.patch_ids, covered.labels, strict=True)]
    result = record_expert_votes(project, user, role, pairs, Vote.Provenance.REGION_IMPORT)
    by_label = {label: covered.labels.count(label) for label in labels if label in covered.labels}
    return {
        **result,
        "regions": len(regions),
        "patches_covered": len(pairs),
        "overlapping": covered.overlapping,
        "by_label": by_label,
    }
