"""Label export and import (annotations.label_files) and the slide overlay, through the API."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from annotations import consensus
from annotations.models import Patch, Role, Vote
from tests.factories import api_client, member

pytestmark = pytest.mark.django_db


def test_votes_export_as_csv_and_json_keep_history(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    expert = api_client(member(project, Role.EXPERT))
    text = expert.get(f"/api/v1/projects/{project.pk}/export/?format=csv&kind=votes").content.decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == Vote.objects.filter(project=project).count() == 24
    assert {r["annotator"] for r in rows} == {"dr_expert", "ann", "bob", "lazy"}
    data = json.loads(expert.get(f"/api/v1/projects/{project.pk}/export/?format=json&kind=consensus").content)
    assert len(data) == 6 and all(row["label"] for row in data)


def test_geojson_export_round_trips_through_import_as_expert_votes(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, truth, _ = labelled
    consensus.recompute_project_consensus(project)
    expert = api_client(member(project, Role.EXPERT))
    exported = expert.get(f"/api/v1/projects/{project.pk}/export/?format=geojson&kind=consensus")
    assert exported["Content-Type"] == "application/geo+json"
    collection = json.loads(exported.content)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 6
    first = collection["features"][0]
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == [patches[0].x, patches[0].y] and ring[2] == [patches[0].x + 224, patches[0].y + 224]
    assert first["properties"]["classification"] == {"name": truth[0], "color": [214, 39, 40]}

    newcomer = member(project, Role.EXPERT, username="dr_new")
    upload = SimpleUploadedFile("labels.geojson", exported.content, content_type="application/geo+json")
    response = api_client(newcomer).post(f"/api/v1/projects/{project.pk}/import/", {"file": upload})
    assert response.status_code == 201, response.content
    assert response.json() == {"imported": 6, "unchanged": 0}
    imported = dict(Vote.objects.filter(annotator=newcomer).values_list("patch_id", "label__name"))
    assert [imported[p.pk] for p in patches] == truth
    assert set(Vote.objects.filter(annotator=newcomer).values_list("role", flat=True)) == {"expert"}


def test_csv_import_with_an_unknown_label_or_patch_writes_nothing(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, *_ = labelled
    expert = api_client(member(project, Role.EXPERT))
    before = Vote.objects.count()
    bad_label = f"slide,x,y,label\ncase-1.svs,{patches[0].x},{patches[0].y},melanoma\n".encode()
    response = expert.post(f"/api/v1/projects/{project.pk}/import/", {"file": SimpleUploadedFile("l.csv", bad_label)})
    assert response.status_code == 400 and "Unknown labels ['melanoma']" in response.json()["detail"]
    bad_patch = (
        f"slide,x,y,label\ncase-1.svs,{patches[0].x},{patches[0].y},benign\ncase-1.svs,99999,99999,benign\n".encode()
    )
    response = expert.post(f"/api/v1/projects/{project.pk}/import/", {"file": SimpleUploadedFile("l.csv", bad_patch)})
    assert response.status_code == 400 and "No patch at (99999, 99999)" in response.json()["detail"]
    assert Vote.objects.count() == before


def test_overlay_shows_crowd_members_only_what_they_voted_on(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, truth, _ = labelled
    consensus.recompute_project_consensus(project)
    slide_id = patches[0].slide_id
    outsider = member(project, Role.CROWD)
    body = api_client(outsider).get(f"/api/v1/projects/{project.pk}/overlay/?slide={slide_id}").json()
    assert body["count"] == 6 and len(body["patches"]["id"]) == 6
    assert all(label is None for label in body["patches"]["label"])
    expert = api_client(member(project, Role.EXPERT)).get(f"/api/v1/projects/{project.pk}/overlay/?slide={slide_id}")
    columns = expert.json()["patches"]
    names = {pid: expert.json()["labels"][i] for pid, i in zip(columns["id"], columns["label"], strict=True)}
    assert [names[p.pk] for p in patches] == truth
    assert columns["x"][columns["id"].index(patches[1].pk)] == patches[1].x
    assert Patch.objects.filter(project=project).count() == 6


def test_a_label_geojson_that_breaks_the_schema_is_refused_whole(labelled) -> None:  # type: ignore[no-untyped-def]
    """Every GeoJSON read is checked against the schema (geojson-pydantic): here features without
    ``"type": "Feature"``, which the per-feature checks alone would have let through."""
    project, patches, *_ = labelled
    expert = api_client(member(project, Role.EXPERT))
    x, y = patches[0].x, patches[0].y
    loose = [
        {
            "properties": {"classification": {"name": "benign"}, "slide": "case-1.svs"},
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + 224, y], [x + 224, y + 224], [x, y]]]},
        }
    ]
    before = Vote.objects.count()
    upload = SimpleUploadedFile("labels.geojson", json.dumps(loose).encode())
    response = expert.post(f"/api/v1/projects/{project.pk}/import/", {"file": upload})
    assert response.status_code == 400 and "not valid GeoJSON" in response.json()["detail"]
    assert Vote.objects.count() == before
    loose[0]["type"] = "Feature"
    upload = SimpleUploadedFile("labels.geojson", json.dumps(loose).encode())
    assert expert.post(f"/api/v1/projects/{project.pk}/import/", {"file": upload}).status_code == 201
