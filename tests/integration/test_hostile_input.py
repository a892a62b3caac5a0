"""Requests written to break the API (issue 11): each gets a 4xx with a clear sentence and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from annotations.models import AnnotationTask, Consensus, Membership, Patch, Project, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member, queue_every_patch

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    slide = SlideFactory(project=project, name="case-1.svs")
    patches = PatchFactory.create_batch(3, slide=slide)
    queue_every_patch(project)
    admin = member(project, Role.ADMIN)
    expert = member(project, Role.EXPERT)
    crowd = member(project, Role.CROWD)
    return project, patches, admin, expert, crowd


def state(project: Project) -> Any:
    """Everything a bad request must leave as it was."""
    return (
        list(Vote.objects.filter(project=project).values_list("id", "label_id", "is_active").order_by("id")),
        list(Consensus.objects.filter(project=project).values_list("patch_id", "label_id", "status")),
        list(
            AnnotationTask.objects.filter(project=project)
            .values_list("id", "kind", "state", "votes_received", "lease_owner_id")
            .order_by("id")
        ),
        list(Patch.objects.filter(project=project).values_list("id", "is_gold").order_by("id")),
        list(Membership.objects.filter(project=project).values_list("id", "role").order_by("id")),
        Project.objects.filter(pk=project.pk).values().first(),
    )


def refused(response: Any, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = response.json()
    text = json.dumps(body)
    assert "Traceback" not in text and len(text) > 10
    return text


def test_a_vote_filter_that_is_not_an_id_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    project, _, _, expert, _ = world
    before = state(project)
    text = refused(api_client(expert).get(f"/api/v1/projects/{project.pk}/votes/?patch=abc"))
    assert "whole number id" in text
    refused(api_client(expert).get(f"/api/v1/projects/{project.pk}/votes/?patch=99999999999999999999999"))
    assert state(project) == before


@pytest.mark.parametrize("path", ["overlay", "export"])
def test_a_slide_id_of_unicode_digits_is_refused(world, path) -> None:  # type: ignore[no-untyped-def]
    project, _, _, expert, _ = world
    before = state(project)
    text = refused(api_client(expert).get(f"/api/v1/projects/{project.pk}/{path}/?slide=%C2%B2"))
    assert "slide" in text
    assert state(project) == before


def test_a_label_of_unicode_digits_is_an_unknown_label_for_votes_and_corrections(world) -> None:  # type: ignore[no-untyped-def]
    project, patches, _, expert, crowd = world
    client = api_client(crowd)
    task = client.post(f"/api/v1/projects/{project.pk}/next-task/").json()
    before = state(project)
    response = client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": task["patch"]["id"], "task": task["id"], "label": "²"},
        format="json",
    )
    assert "Unknown label" in refused(response)
    assert state(project) == before
    vote = api_client(expert).post(
        f"/api/v1/projects/{project.pk}/votes/", {"patch": patches[0].pk, "label": "benign"}, format="json"
    )
    assert vote.status_code == 201
    before = state(project)
    vote_id = vote.json()["vote"]["id"]
    response = api_client(expert).post(
        f"/api/v1/projects/{project.pk}/votes/{vote_id}/correct/", {"label": "²"}, format="json"
    )
    assert "Unknown label" in refused(response)
    assert state(project) == before


@pytest.mark.parametrize("field", ["patch", "task"])
def test_an_id_beyond_any_database_id_is_refused(world, field) -> None:  # type: ignore[no-untyped-def]
    project, patches, _, expert, _ = world
    before = state(project)
    body = {"patch": patches[0].pk, "label": "benign", field: 10**30}
    refused(api_client(expert).post(f"/api/v1/projects/{project.pk}/votes/", body, format="json"))
    assert state(project) == before


def test_deeply_nested_json_is_a_parse_error(world) -> None:  # type: ignore[no-untyped-def]
    project, _, _, expert, _ = world
    before = state(project)
    response = api_client(expert).generic(
        "POST", f"/api/v1/projects/{project.pk}/votes/", "[" * 10_000, content_type="application/json"
    )
    assert "nested too deeply" in refused(response)
    assert state(project) == before


def test_a_number_too_large_for_a_float_is_a_parse_error(world) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    before = state(project)
    response = api_client(admin).generic(
        "PATCH", f"/api/v1/projects/{project.pk}/", '{"expert_weight": 1e400}', content_type="application/json"
    )
    assert "too large" in refused(response)
    assert state(project) == before


LABEL_FILES = [
    ("labels.json", b"[1]", "not a GeoJSON Feature"),
    ("labels.json", b'{"type": "FeatureCollection", "features": [{"properties": "s"}]}', "JSON objects"),
    (
        "labels.geojson",
        b'[{"properties": {"classification": {"name": "benign"}, "slide": "case-1.svs"},'
        b' "geometry": {"type": "Polygon", "coordinates": [[[1e400, 0], [0, 0], [0, 1], [1e400, 0]]]}}]',
        "finite numbers",
    ),
    ("labels.json", b"[" * 100_000, "nested too deeply"),
    ("labels.csv", b"slide,x,y,label\ncase-1.svs,inf,0,benign\n", "finite numbers"),
    ("labels.csv", b"slide,x,y,label\ncase-1.svs,0,0\ncase-1.svs,224,0,melanoma\n", "needs a slide and a label"),
]


@pytest.mark.parametrize(("name", "content", "message"), LABEL_FILES)
def test_a_malformed_label_file_is_refused_whole(world, name, content, message) -> None:  # type: ignore[no-untyped-def]
    project, _, _, expert, _ = world
    before = state(project)
    upload = SimpleUploadedFile(name, content)
    response = api_client(expert).post(f"/api/v1/projects/{project.pk}/import/", {"file": upload})
    assert message in refused(response)
    assert state(project) == before


@pytest.mark.parametrize("path", ["patches/{patch}/gold/", "members/{member}/"])
def test_a_json_list_where_an_object_belongs_is_refused(world, path) -> None:  # type: ignore[no-untyped-def]
    project, patches, admin, _, crowd = world
    url = f"/api/v1/projects/{project.pk}/" + path.format(
        patch=patches[0].pk, member=Membership.objects.get(user=crowd).pk
    )
    before = state(project)
    method = "PATCH" if "members" in path else "POST"
    response = api_client(admin).generic(method, url, "[1]", content_type="application/json")
    refused(response)
    assert state(project) == before


def test_the_string_false_does_not_mark_a_patch_gold(world) -> None:  # type: ignore[no-untyped-def]
    project, patches, admin, expert, _ = world
    api_client(expert).post(
        f"/api/v1/projects/{project.pk}/votes/", {"patch": patches[0].pk, "label": "benign"}, format="json"
    )
    client = api_client(admin)
    url = f"/api/v1/projects/{project.pk}/patches/{patches[0].pk}/gold/"
    assert client.post(url, {"gold": "false"}, format="json").json()["is_gold"] is False
    assert client.post(url, {"gold": "false"}).json()["is_gold"] is False  # a form field too
    assert not Patch.objects.get(pk=patches[0].pk).is_gold
    assert client.post(url, {"gold": "maybe"}, format="json").status_code == 400
    assert client.post(url, {}, format="json").json()["is_gold"] is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lease_minutes", 10**9),
        ("votes_required", 2078),
        ("batch_size", 14_000_000),
        ("name", "bad\x07name"),
        ("name", "line\nbreak"),
        ("description", "x" * 200_000),
        ("seed", 2**40),
        ("expert_weight", 10**6),
        ("expert_cost", 0),
        ("crowd_cost", -1),
        ("expert_cost", 10**6),
        ("crowd_cost", "cheap"),
        ("redundancy_confidence", 0.1),
    ],
)
def test_project_settings_out_of_range_are_refused(world, field, value) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    before = state(project)
    response = api_client(admin).patch(f"/api/v1/projects/{project.pk}/", {field: value}, format="json")
    assert field in refused(response)
    assert state(project) == before


def test_label_names_with_control_characters_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    response = api_client(admin).post(
        f"/api/v1/projects/{project.pk}/labels/", {"name": "ne\tw", "hotkey": "7", "order": 7}, format="json"
    )
    assert "name" in refused(response)
    assert project.label_classes.count() == 3


def test_a_student_cannot_tell_a_gold_check_from_real_work(world) -> None:  # type: ignore[no-untyped-def]
    project, patches, admin, expert, crowd = world
    api_client(expert).post(
        f"/api/v1/projects/{project.pk}/votes/", {"patch": patches[0].pk, "label": "benign"}, format="json"
    )
    assert api_client(admin).post(f"/api/v1/projects/{project.pk}/patches/{patches[0].pk}/gold/").status_code == 200
    Project.objects.filter(pk=project.pk).update(gold_rate=1.0)
    student: APIClient = api_client(crowd)
    task = student.post(f"/api/v1/projects/{project.pk}/next-task/?ahead=1").json()
    assert AnnotationTask.objects.get(pk=task["id"]).kind == AnnotationTask.Kind.GOLD  # it is a gold check
    assert task["kind"] == "crowd" and task["arm"] == "" and task["patch"]["is_gold"] is False
    detail = student.get(f"/api/v1/projects/{project.pk}/patches/{patches[0].pk}/").json()
    assert detail["patch"]["is_gold"] is False
    # Experts and admins still see it for what it is.
    shown = api_client(admin).get(f"/api/v1/projects/{project.pk}/patches/{patches[0].pk}/").json()
    assert shown["patch"]["is_gold"] is True


def test_a_body_over_the_in_memory_limit_is_a_json_413(world) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    before = state(project)
    response = api_client(admin).patch(
        f"/api/v1/projects/{project.pk}/", {"description": "x" * 7_000_000}, format="json"
    )
    assert "larger than" in refused(response, 413)
    assert state(project) == before


def test_a_form_body_with_too_many_fields_is_a_json_400(world, settings) -> None:  # type: ignore[no-untyped-def]
    """Django refuses a form of more than DATA_UPLOAD_MAX_NUMBER_FIELDS fields while DRF parses it; the API
    says so in JSON (the fuzzer found the bulk-vote endpoint answering Django's HTML 400 page)."""
    project, patches, _, expert, _ = world
    before = state(project)
    fields = "&".join(f"exclude={i}" for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    response = api_client(expert).post(
        f"/api/v1/projects/{project.pk}/votes/bulk/",
        f"label=benign&patches={patches[0].pk}&{fields}",
        content_type="application/x-www-form-urlencoded",
    )
    assert "data_upload_max_number_fields" in refused(response).lower()
    assert state(project) == before


@pytest.mark.parametrize("path", ["labels/abc/", "labels/%0A/", "members/-1/", "nothing-here/"])
def test_an_api_url_that_names_no_endpoint_is_a_json_404_for_any_method(world, path) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    before = state(project)
    for method in ("GET", "DELETE", "PATCH"):
        response = api_client(admin).generic(method, f"/api/v1/projects/{project.pk}/{path}")
        assert "No such endpoint" in refused(response, 404)
    assert state(project) == before


def test_an_api_url_missing_its_trailing_slash_says_which_one_was_meant(world) -> None:  # type: ignore[no-untyped-def]
    project, _, admin, _, _ = world
    response = api_client(admin).get(f"/api/v1/projects/{project.pk}/labels")
    assert f"did you mean /api/v1/projects/{project.pk}/labels/" in refused(response, 404)
