"""QuPath region annotations in (annotations.regions), through the API, on a real slide: coverage,
holes and multipolygons, the vote path and its provenance, and every kind of bad file refused whole."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from geojson_pydantic import FeatureCollection

from annotations import consensus
from annotations.models import Consensus, Patch, Project, Role, Slide, Vote
from annotations.slides import ingest
from tests.conftest import SLIDES_DIR
from tests.factories import ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db


@pytest.fixture
def slide_project() -> tuple[Project, Slide, Any, tuple[int, int, int]]:
    """The real CMU-1 region ingested; the top-left corner and edge of a 4 x 4 block of grid patches."""
    project = ProjectFactory(votes_required=3)
    slide = ingest.add_slide_from_path(project, SLIDES_DIR / "cmu-1-small-region.svs", launch=False)
    ingest.ingest(slide.pk)
    slide.refresh_from_db()
    expert = member(project, Role.EXPERT, username="dr_region")
    cells = set(Patch.objects.filter(slide=slide).values_list("x", "y"))
    size = Patch.objects.filter(slide=slide).values_list("size", flat=True).first()
    assert size is not None
    block = next(
        (x, y)
        for x, y in sorted(cells)
        if all((x + i * size, y + j * size) in cells for i in range(4) for j in range(4))
    )
    return project, slide, expert, (*block, size)


@pytest.fixture
def grid_project() -> tuple[Project, Slide, Any, tuple[int, int, int]]:
    """A slide row with CMU-1's region geometry and a full 224 px grid, without reading pixels: for the
    refusals, which never get as far as the patches (the real slide is ingested for the imports)."""
    project = ProjectFactory(votes_required=3)
    slide = SlideFactory(project=project, width=2220, height=2967)
    Patch.objects.bulk_create(
        [
            Patch(project=project, slide=slide, x=x, y=y, size=224, magnification=20.0)
            for x in range(0, 2220 - 223, 224)
            for y in range(0, 2967 - 223, 224)
        ]
    )
    return project, slide, member(project, Role.EXPERT, username="dr_grid"), (448, 448, 224)


def ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict[str, Any], name: str | None, **props: Any) -> dict[str, Any]:
    """A feature as QuPath 0.4+ writes it."""
    properties: dict[str, Any] = {"objectType": "annotation", **props}
    if name is not None:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {
        "type": "Feature",
        "id": "4f9d7d3e-6c1b-4c53-9d0a-2b6b0a0c2a11",
        "geometry": geometry,
        "properties": properties,
    }


def upload(client: Any, project: Project, slide: Slide, data: Any, **fields: Any) -> Any:
    content = data if isinstance(data, bytes) else json.dumps(data).encode()
    body = {
        "file": SimpleUploadedFile("regions.geojson", content, content_type="application/geo+json"),
        "slide": slide.pk,
    }
    return client.post(f"/api/v1/projects/{project.pk}/regions/", {**body, **fields})


def labels_at(slide: Slide, user: Any) -> dict[tuple[int, int], str]:
    votes = Vote.objects.filter(patch__slide=slide, annotator=user, is_active=True)
    return {(x, y): label for x, y, label in votes.values_list("patch__x", "patch__y", "label__name")}


def test_patches_covered_enough_by_a_region_get_its_class_as_an_expert_vote(slide_project) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = slide_project
    client = api_client(expert)
    # Class 1: a 3 x 3 block with the middle patch cut out as a hole.
    donut = {
        "type": "Polygon",
        "coordinates": [ring(x, y, x + 3 * s, y + 3 * s), ring(x + s, y + s, x + 2 * s, y + 2 * s)],
    }
    # Class 2, a MultiPolygon of two parts apart: 0.9 of the fourth column's first patch, 0.6 of the next two.
    strip = {
        "type": "MultiPolygon",
        "coordinates": [[ring(x + 3 * s, y, x + 4 * s, y + 0.9 * s)], [ring(x + 3 * s, y + s, x + 3.6 * s, y + 3 * s)]],
    }
    collection = {
        "type": "FeatureCollection",
        "features": [feature(donut, "adenocarcinoma"), feature(strip, "benign", isLocked=False)],
    }
    response = upload(client, project, slide, collection)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body == {
        "imported": 11,
        "unchanged": 0,
        "regions": 2,
        "patches_covered": 11,
        "overlapping": 0,
        "by_label": {"adenocarcinoma": 8, "benign": 3},
    }
    got = labels_at(slide, expert)
    ring_cells = {(x + i * s, y + j * s) for i in range(3) for j in range(3)} - {(x + s, y + s)}
    assert {cell for cell, label in got.items() if label == "adenocarcinoma"} == ring_cells
    assert {cell for cell, label in got.items() if label == "benign"} == {
        (x + 3 * s, y),
        (x + 3 * s, y + s),
        (x + 3 * s, y + 2 * s),
    }
    votes = Vote.objects.filter(annotator=expert)
    assert set(votes.values_list("provenance", "role")) == {("region-import", "expert")}
    # Through the normal vote path: each patch's consensus follows the expert.
    assert set(Consensus.objects.filter(patch__in=votes.values("patch")).values_list("status", flat=True)) == {"expert"}

    # The same file again changes nothing; a stricter coverage drops the 0.6 patches' votes from the count.
    again = upload(client, project, slide, collection, min_coverage=0.7).json()
    assert (again["imported"], again["unchanged"], again["patches_covered"]) == (0, 9, 9)
    assert Vote.objects.filter(annotator=expert).count() == 11


def test_a_later_region_import_corrects_the_importers_earlier_vote(slide_project) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = slide_project
    square = {"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}
    assert upload(api_client(expert), project, slide, [feature(square, "benign")]).status_code == 201
    response = upload(api_client(expert), project, slide, feature(square, "squamous"))  # a bare Feature
    assert response.status_code == 201 and response.json()["imported"] == 1
    history = Vote.objects.filter(annotator=expert).order_by("id")
    assert [(v.label.name, v.is_active) for v in history] == [("benign", False), ("squamous", True)]
    assert history[1].supersedes_id == history[0].pk


def test_two_classes_over_one_patch_give_it_the_larger_share(slide_project) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = slide_project
    big = {"type": "Polygon", "coordinates": [ring(x, y, x + 0.8 * s, y + s)]}
    small = {"type": "Polygon", "coordinates": [ring(x + 0.4 * s, y, x + s, y + s)]}
    body = upload(
        api_client(expert), project, slide, [feature(big, "squamous"), feature(small, "benign")], min_coverage=0.5
    ).json()
    assert body["overlapping"] == 1 and body["by_label"] == {"squamous": 1}


def square(x: float, y: float, s: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}


def with_good(bad: dict[str, Any]) -> Callable[[int, int, int, Slide], Any]:
    """A collection of a good region and ``bad``: the good one must not be imported either."""
    return lambda x, y, s, slide: {
        "type": "FeatureCollection",
        "features": [feature(square(x, y, 2 * s), "benign"), bad],
    }


def geometry_case(make: Callable[[int, int, int, Slide], dict[str, Any]], **props: Any) -> Any:
    return lambda x, y, s, slide: with_good(feature(make(x, y, s, slide), "benign", **props))(x, y, s, slide)


BAD_FILES: list[tuple[str, Any, str]] = [
    ("invalid JSON", b'{"type": "FeatureCollection", "features": [', "not valid JSON"),
    ("not UTF-8", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (
        "a ring of three points",
        with_good(feature({"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [0, 0]]]}, "benign")),
        "not valid GeoJSON",
    ),
    (
        "a string for a coordinate",
        with_good(feature({"type": "Polygon", "coordinates": [[["a", 0], [9, 0], [9, 9], ["a", 0]]]}, "benign")),
        "not valid GeoJSON",
    ),
    ("no geometry", with_good({"type": "Feature", "properties": {"classification": {"name": "benign"}}}), "not valid"),
    ("an unknown class", lambda x, y, s, slide: [feature(square(x, y, s), "melanoma")], "Unknown classes ['melanoma']"),
    (
        "no classification",
        lambda x, y, s, slide: with_good(feature(square(x, y, s), None))(x, y, s, slide),
        "has no classification",
    ),
    (
        "self-intersecting",
        geometry_case(
            lambda x, y, s, slide: {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + s, y + s], [x + s, y], [x, y + s], [x, y]]],
            }
        ),
        "not a valid polygon: Self-intersection",
    ),
    (
        "outside the slide",
        geometry_case(lambda x, y, s, slide: {"type": "Polygon", "coordinates": [ring(x, y, slide.width + 10, y + s)]}),
        "outside the slide",
    ),
    (
        "negative coordinates",
        geometry_case(lambda x, y, s, slide: {"type": "Polygon", "coordinates": [ring(-5, y, x + s, y + s)]}),
        "outside the slide",
    ),
    (
        "a zero-area polygon",
        geometry_case(
            lambda x, y, s, slide: {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + 2 * s, y], [x, y]]]}
        ),
        "not a valid polygon",
    ),
    (
        "a point",
        geometry_case(lambda x, y, s, slide: {"type": "Point", "coordinates": [x, y]}),
        "only Polygon and MultiPolygon",
    ),
    (
        "a detection",
        geometry_case(lambda x, y, s, slide: square(x, y, s), objectType="detection"),
        "annotations (regions) only",
    ),
    ("no features", {"type": "FeatureCollection", "features": []}, "holds no regions"),
    ("a bare geometry", lambda x, y, s, slide: square(x, y, s), "Expected a GeoJSON"),
]


@pytest.mark.parametrize(("case", "payload", "message"), BAD_FILES, ids=[c for c, *_ in BAD_FILES])
def test_a_bad_file_is_a_400_that_writes_nothing(grid_project, case: str, payload: Any, message: str) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = grid_project
    data = payload(x, y, s, slide) if callable(payload) else payload
    before = (Vote.objects.count(), Consensus.objects.count())
    response = upload(api_client(expert), project, slide, data)
    assert response.status_code == 400, (case, response.content)
    assert message in response.json()["detail"], response.json()
    assert (Vote.objects.count(), Consensus.objects.count()) == before


def test_nan_coordinates_are_refused(grid_project) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = grid_project
    text = json.dumps([feature({"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}, "benign")])
    text = text.replace(f"[{x + s}, {y}]", "[NaN, 5]", 1)
    response = upload(api_client(expert), project, slide, text.encode())
    assert response.status_code == 400 and "finite" in response.json()["detail"]
    assert not Vote.objects.exists()


@pytest.mark.parametrize("coverage", ["0", "-1", "1.5", "abc", "nan"])
def test_a_coverage_outside_0_to_1_is_a_400(grid_project, coverage: str) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = grid_project
    data = [feature({"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}, "benign")]
    response = upload(api_client(expert), project, slide, data, min_coverage=coverage)
    assert response.status_code == 400 and "min_coverage" in response.json()
    assert not Vote.objects.exists()


def test_an_oversize_file_or_another_projects_slide_or_a_crowd_member_is_refused(grid_project, settings) -> None:  # type: ignore[no-untyped-def]
    project, slide, expert, (x, y, s) = grid_project
    data = [feature({"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}, "benign")]
    settings.MAX_IMPORT_BYTES = 100
    response = upload(api_client(expert), project, slide, data)
    assert response.status_code == 413 and "not accepted" in response.json()["detail"]
    settings.MAX_IMPORT_BYTES = 50 * 1024**2
    other = ProjectFactory()
    elsewhere = Slide.objects.create(project=other, name="x.svs", status="ready", width=10_000, height=10_000)
    response = upload(api_client(expert), project, elsewhere, data)
    assert response.status_code == 400 and "No slide with that id" in response.json()["detail"]
    assert upload(api_client(member(project, Role.CROWD)), project, slide, data).status_code == 403
    assert upload(api_client(member(other, Role.EXPERT)), project, slide, data).status_code == 404
    assert not Vote.objects.exists()


def test_too_many_vertices_is_refused(grid_project, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from annotations import regions

    project, slide, expert, (x, y, s) = grid_project
    monkeypatch.setattr(regions, "MAX_VERTICES", 8)
    data = [feature({"type": "Polygon", "coordinates": [ring(x, y, x + s, y + s)]}, "benign")] * 2
    response = upload(api_client(expert), project, slide, data)
    assert response.status_code == 400 and "simplify them" in response.json()["detail"]


def test_the_qupath_export_is_valid_geojson_and_comes_back_in_as_regions(labelled) -> None:  # type: ignore[no-untyped-def]
    """What we write (the consensus export QuPath opens) passes the same schema the import checks."""
    project, patches, truth, _ = labelled
    consensus.recompute_project_consensus(project)
    expert = api_client(member(project, Role.EXPERT, username="dr_geo"))
    exported = expert.get(f"/api/v1/projects/{project.pk}/export/?format=geojson&kind=consensus")
    collection = FeatureCollection.model_validate_json(exported.content)
    assert len(collection.features) == 6
    assert {f.geometry.type for f in collection.features} == {"Polygon"}  # type: ignore[union-attr]
    slide = Slide.objects.get(pk=patches[0].slide_id)
    # The factory's patch positions follow a suite-wide sequence: make the slide hold them all.
    Slide.objects.filter(pk=slide.pk).update(
        width=max(p.x + p.size for p in patches), height=max(p.y + p.size for p in patches)
    )
    slide.refresh_from_db()
    response = upload(expert, project, slide, exported.content, min_coverage=1.0)
    assert response.status_code == 201, response.content
    assert response.json()["patches_covered"] == 6
    imported = dict(Vote.objects.filter(annotator__username="dr_geo").values_list("patch_id", "label__name"))
    assert [imported[p.pk] for p in patches] == truth


def test_coverage_of_a_large_grid_matches_the_exact_areas() -> None:
    """100,000 patch squares and an 8,000-vertex disc with a hole: the STRtree pass (only patches the
    region meets; those wholly inside skip the intersection) gives what exact per-patch areas give."""
    import numpy as np
    import shapely

    from annotations.regions import Region, coverage

    project = ProjectFactory(classes=[("tumour", "#d62728"), ("stroma", "#2ca02c")])
    slide = Slide.objects.create(project=project, name="big.svs", status="ready", width=316 * 100, height=316 * 100)
    n = 316
    xs, ys = np.meshgrid(np.arange(n) * 100, np.arange(n) * 100)
    Patch.objects.bulk_create(
        [
            Patch(project=project, slide=slide, x=int(a), y=int(b), size=100, magnification=20.0)
            for a, b in zip(xs.ravel(), ys.ravel(), strict=True)
        ],
        batch_size=10_000,
    )
    disc = shapely.Point(15_800, 15_800).buffer(10_000, quad_segs=2000)  # 8,000 vertices
    hole = shapely.Point(15_800, 15_800).buffer(3_000, quad_segs=500)
    region = shapely.Polygon(disc.exterior.coords, [hole.exterior.coords])
    result = coverage([Region(number=1, label="tumour", geometry=region)], slide, ["tumour", "stroma"], 0.5)
    # The exact answer, from the circles' analytic geometry (the polygons are within 0.001 px of
    # them): a square wholly in the ring is covered 1, wholly in the hole or outside 0; only the
    # squares a circle crosses need their intersection area.
    left, top = xs.ravel().astype(float), ys.ravel().astype(float)
    near_x = np.clip(15_800, left, left + 100) - 15_800
    near_y = np.clip(15_800, top, top + 100) - 15_800
    nearest = np.hypot(near_x, near_y)
    farthest = np.hypot(
        np.maximum(abs(left - 15_800), abs(left + 100 - 15_800)), np.maximum(abs(top - 15_800), abs(top + 100 - 15_800))
    )
    share = np.where((nearest >= 3_001) & (farthest <= 9_999), 1.0, 0.0)
    crossed = ~(((nearest >= 3_001) & (farthest <= 9_999)) | (farthest <= 2_999) | (nearest >= 10_001))
    boxes = shapely.box(left[crossed], top[crossed], left[crossed] + 100, top[crossed] + 100)
    share[crossed] = shapely.area(shapely.intersection(boxes, region)) / 10_000
    exact = share
    assert len(result.patch_ids) == int((exact >= 0.5 - 1e-9).sum())
    assert set(result.labels) == {"tumour"}


def test_region_files_travel_as_multipart_under_the_import_body_limit() -> None:
    from histoloop.body_limit import upload_routes_from_settings

    routes = {route.what: route for route in upload_routes_from_settings()}
    assert routes["region imports"].pattern.match("/api/v1/projects/12/regions/")
