"""The accept-the-model strip: patches the latest model assigns to a class (from its stored scores), accepted
and flipped as votes in one transaction, and the project setting that decides who may use it (enforced by
the endpoints, not only the page)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from annotations import voting
from annotations.models import Consensus, Patch, Role, Vote
from learner import scores
from learner.models import ModelVersion, TrainingRound
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db
NAMES = ["adenocarcinoma", "benign", "squamous"]


def scored_project(n: int = 30, **kwargs: Any) -> tuple[Any, list[Patch], np.ndarray, ModelVersion]:
    """Patches on two slides and a model version whose scores say patch i is class i % 3, with a
    confidence that falls with i (so the ranking is known)."""
    project = ProjectFactory(**kwargs)
    patches = PatchFactory.create_batch(n // 2, slide=SlideFactory(project=project))
    patches += PatchFactory.create_batch(n - n // 2, slide=SlideFactory(project=project))
    round_ = TrainingRound.objects.create(project=project, number=1, state="succeeded")
    version = ModelVersion.objects.create(
        project=project, round=round_, backbone="b", train_mode="head", weights_path="", class_names=NAMES
    )
    proba = np.full((n, 3), 0.0, dtype=np.float32)
    for i in range(n):
        top = 0.95 - i * 0.01
        proba[i] = (1 - top) / 2
        proba[i, i % 3] = top
    ids = np.array([p.pk for p in patches], dtype=np.int64)
    slides = np.array([p.slide_id for p in patches], dtype=np.int64)
    scores.write(version, ids, slides, proba)
    return project, patches, proba, version


def strip_url(project: Any, query: str = "") -> str:
    return f"/api/v1/projects/{project.pk}/suggestions/{query}"


def accept_url(project: Any) -> str:
    return f"/api/v1/projects/{project.pk}/suggestions/accept/"


def test_the_strip_lists_the_class_by_confidence_or_uncertainty_and_leaves_out_what_is_settled() -> None:
    project, patches, _, version = scored_project()
    expert = member(project, Role.EXPERT)
    client = api_client(expert)
    body = client.get(strip_url(project, "?label=benign&n=5")).json()
    assert body["model_version"] == version.pk and body["label"] == "benign" and body["order"] == "confidence"
    benign = [p.pk for i, p in enumerate(patches) if i % 3 == 1]
    assert [r["id"] for r in body["patches"]] == benign[:5]
    assert body["patches"][0]["probability"] == pytest.approx(0.94, abs=1e-4)
    assert all(r["runner_up"] in ("adenocarcinoma", "squamous") for r in body["patches"])
    unsure = client.get(strip_url(project, "?label=benign&n=5&order=uncertainty")).json()["patches"]
    assert [r["id"] for r in unsure] == benign[::-1][:5]
    # Settled patches (an expert label) and the caller's own votes drop out.
    voting.cast_vote(project, member(project, Role.EXPERT), Role.EXPERT, patch_id=benign[0], label="benign")
    voting.cast_vote(project, expert, Role.EXPERT, patch_id=benign[1], label="squamous")
    left = [r["id"] for r in client.get(strip_url(project, "?label=benign&n=5")).json()["patches"]]
    assert left == benign[2:7]


def test_enter_accepts_the_rest_and_flips_in_one_transaction() -> None:
    project, _, _, version = scored_project()
    expert = member(project, Role.EXPERT)
    client = api_client(expert)
    strip = [r["id"] for r in client.get(strip_url(project, "?label=squamous&n=6")).json()["patches"]]
    flipped, accepted = strip[1], [pid for pid in strip if pid != strip[1]]
    body = {
        "label": "squamous",
        "model_version": version.pk,
        "accept": accepted,
        "relabel": [{"patch": flipped, "label": "benign"}],
    }
    response = client.post(accept_url(project), body, format="json")
    assert response.status_code == 201, response.content
    result = response.json()
    assert len(result["votes"]) == 6 and result["skipped"] == []
    votes = {v.patch_id: v for v in Vote.objects.filter(project=project, annotator=expert)}
    assert set(votes) == set(strip)
    for pid in accepted:
        assert votes[pid].label.name == "squamous" and votes[pid].provenance == "accepted-suggestion"
        assert votes[pid].model_version_shown_id == version.pk and votes[pid].role == "expert"
    assert votes[flipped].label.name == "benign" and votes[flipped].provenance == "manual"
    consensus = {c.patch_id: c for c in Consensus.objects.filter(patch_id__in=strip).select_related("label")}
    assert all(consensus[pid].label.name == "squamous" and consensus[pid].status == "expert" for pid in accepted)
    assert consensus[flipped].label.name == "benign"
    assert result["consensus"][str(flipped)] == {"label": "benign", "status": "expert"}
    # The strip no longer offers them.
    assert not set(strip) & {r["id"] for r in client.get(strip_url(project, "?label=squamous")).json()["patches"]}


def test_a_bad_item_refuses_the_whole_enter() -> None:
    project, patches, _, version = scored_project()
    client = api_client(member(project, Role.EXPERT))
    other_project, _, _, other_version = scored_project()
    ids = [p.pk for p in patches[:4]]
    stranger = Patch.objects.filter(project=other_project).first()
    assert stranger is not None
    bad_bodies = [
        {"label": "benign", "model_version": version.pk, "accept": [*ids, stranger.pk]},
        {"label": "benign", "model_version": other_version.pk, "accept": ids},
        {"label": "nope", "model_version": version.pk, "accept": ids},
        {"label": "benign", "model_version": version.pk, "accept": ids, "relabel": [{"patch": ids[0], "label": "x"}]},
        {
            "label": "benign",
            "model_version": version.pk,
            "accept": ids,
            "relabel": [{"patch": ids[0], "label": "benign"}],
        },
        {"label": "benign", "model_version": version.pk, "accept": []},
        {"label": "benign", "model_version": version.pk, "accept": list(range(1, 502))},
        {"label": "benign", "model_version": "1; drop table", "accept": ids},
        {"label": "benign", "accept": ids},
    ]
    for body in bad_bodies:
        response = client.post(accept_url(project), body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert "detail" in response.json() or response.json()
        assert not Vote.objects.filter(project=project).exists(), body
    for query in ("?n=0", "?n=201", "?n=x", "?order=random", "?label=nope"):
        assert client.get(strip_url(project, query)).status_code == 400, query


def test_the_setting_decides_who_may_use_the_strip_and_the_endpoints_enforce_it() -> None:
    project, patches, _, version = scored_project()
    crowd, expert, admin = (member(project, r) for r in (Role.CROWD, Role.EXPERT, Role.ADMIN))
    body = {"label": "benign", "model_version": version.pk, "accept": [patches[1].pk]}
    # Default: experts and admins; the crowd is refused with a clear message.
    assert project.suggestion_strip == "experts"
    refused = api_client(crowd).get(strip_url(project))
    assert refused.status_code == 403 and "suggestion_strip" in refused.json()["detail"]
    assert api_client(crowd).post(accept_url(project), body, format="json").status_code == 403
    assert api_client(expert).get(strip_url(project)).status_code == 200
    assert api_client(admin).get(strip_url(project)).status_code == 200
    # Off: nobody.
    project.suggestion_strip = "off"
    project.save()
    assert api_client(expert).get(strip_url(project)).status_code == 403
    assert api_client(admin).post(accept_url(project), body, format="json").status_code == 403
    assert not Vote.objects.filter(project=project).exists()
    # Crowd only: experts are refused, crowd members' accepted votes land as crowd votes without a task,
    # and the answer tells them no consensus (blind labelling).
    project.suggestion_strip = "crowd"
    project.save()
    assert api_client(expert).get(strip_url(project)).status_code == 403
    seen = api_client(crowd).get(strip_url(project, "?label=benign")).json()
    assert patches[1].pk in [r["id"] for r in seen["patches"]]
    response = api_client(crowd).post(accept_url(project), body, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["consensus"] == {}
    vote = Vote.objects.get(project=project)
    assert vote.role == "crowd" and vote.task_id is None and vote.provenance == "accepted-suggestion"
    # Both: everyone; gold checks never reach the crowd's strip.
    project.suggestion_strip = "both"
    project.save()
    patches[4].is_gold = True
    patches[4].save()
    assert api_client(expert).get(strip_url(project)).status_code == 200
    crowd_seen = api_client(crowd).get(strip_url(project, "?label=benign&n=50")).json()["patches"]
    assert patches[4].pk not in [r["id"] for r in crowd_seen]
    # Outsiders see nothing of the project.
    outsider = member(ProjectFactory(), Role.ADMIN)
    assert api_client(outsider).get(strip_url(project)).status_code == 404


def test_the_setting_is_validated_through_the_project_api() -> None:
    project = ProjectFactory()
    admin = api_client(member(project, Role.ADMIN))
    url = f"/api/v1/projects/{project.pk}/"
    assert admin.patch(url, {"suggestion_strip": "everyone"}, format="json").status_code == 400
    response = admin.patch(url, {"suggestion_strip": "both"}, format="json")
    assert response.status_code == 200 and response.json()["suggestion_strip"] == "both"


def test_without_a_model_the_strip_is_empty() -> None:
    project = ProjectFactory()
    body = api_client(member(project, Role.EXPERT)).get(strip_url(project)).json()
    assert body == {"model_version": None, "label": "adenocarcinoma", "order": "confidence", "patches": []}
