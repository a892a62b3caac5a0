"""The viewer's prediction heatmap: one slide's stored scores for one class, as columns."""

from __future__ import annotations

import pytest

from annotations.models import Role
from learner.models import ModelVersion, TrainingRound
from tests.factories import api_client, member
from tests.integration.test_suggestion_strip import NAMES, scored_project

pytestmark = pytest.mark.django_db


def heatmap(client, project, slide_id, label=""):  # type: ignore[no-untyped-def]
    query = f"?slide={slide_id}" + (f"&label={label}" if label else "")
    return client.get(f"/api/v1/projects/{project.pk}/heatmap/{query}")


def test_the_heatmap_gives_one_column_per_field_for_the_slides_scored_patches() -> None:
    project, patches, proba, version = scored_project(n=10)
    client = api_client(member(project, Role.EXPERT))
    slide = patches[0].slide_id
    body = heatmap(client, project, slide, "squamous").json()
    on_slide = [p for p in patches if p.slide_id == slide]
    assert body["model_version"] == version.pk and body["label"] == "squamous" and body["count"] == len(on_slide)
    assert body["patches"]["id"] == sorted(p.pk for p in on_slide)
    by_id = {p.pk: i for i, p in enumerate(patches)}
    expected = [round(float(proba[by_id[pid], NAMES.index("squamous")]), 5) for pid in body["patches"]["id"]]
    assert body["patches"]["prob"] == pytest.approx(expected, abs=1e-5)
    assert body["patches"]["x"] == [next(p.x for p in on_slide if p.pk == pid) for pid in body["patches"]["id"]]
    assert heatmap(client, project, slide, "melanoma").status_code == 400


def test_a_newer_version_without_classes_is_passed_over_not_a_server_error() -> None:
    project, patches, _, version = scored_project(n=6)
    round_ = TrainingRound.objects.create(project=project, number=2, state="succeeded")
    ModelVersion.objects.create(project=project, round=round_, backbone="b", train_mode="head", weights_path="")
    client = api_client(member(project, Role.EXPERT))
    response = heatmap(client, project, patches[0].slide_id)
    assert response.status_code == 200 and response.json()["model_version"] == version.pk
    assert response.json()["label"] == NAMES[0]


def test_without_any_usable_model_the_heatmap_says_so_with_empty_columns() -> None:
    project, patches, _, version = scored_project(n=4)
    ModelVersion.objects.filter(pk=version.pk).update(class_names=[])
    body = heatmap(api_client(member(project, Role.EXPERT)), project, patches[0].slide_id).json()
    assert body["model_version"] is None and body["count"] == 0 and body["patches"]["id"] == []
