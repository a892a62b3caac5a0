"""Agreement, batch consensus, overlay and label export/import through the API."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from annotations import reports, voting
from annotations.models import Consensus, Patch, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db


@pytest.fixture
def labelled():  # type: ignore[no-untyped-def]
    """6 patches; an expert labels all; three crowd members label all, one of them always 'benign'."""
    project = ProjectFactory(votes_required=3, consensus_method="dawid_skene")
    slide = SlideFactory(project=project, name="case-1.svs")
    patches = PatchFactory.create_batch(6, slide=slide)
    truth = ["adenocarcinoma", "benign", "squamous", "adenocarcinoma", "benign", "squamous"]
    expert = member(project, Role.EXPERT, username="dr_expert")
    good1, good2, lazy = (member(project, Role.CROWD, username=n) for n in ("ann", "bob", "lazy"))
    for patch, label in zip(patches, truth, strict=True):
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=label)
        for user, answer in ((good1, label), (good2, label), (lazy, "benign")):
            answer_label = project.label_classes.get(name=answer)
            Vote.objects.create(project=project, patch=patch, annotator=user, label=answer_label, role=Role.CROWD)
    return project, patches, truth, expert


def test_batch_consensus_runs_dawid_skene_and_writes_every_patch(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, truth, _ = labelled
    admin = api_client(member(project, Role.ADMIN))
    response = admin.post(f"/api/v1/projects/{project.pk}/consensus/recompute/")
    assert response.status_code == 200 and response.json()["recomputed"] == 6
    rows = {c.patch_id: c for c in Consensus.objects.filter(project=project)}
    assert [rows[p.pk].label.name for p in patches] == truth
    assert {c.method for c in rows.values()} == {"dawid_skene"}


def test_agreement_report_names_the_unreliable_annotator(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    body = api_client(member(project, Role.EXPERT)).get(f"/api/v1/projects/{project.pk}/agreement/").json()
    kappas = {a["username"]: a["cohen_kappa_vs_experts"] for a in body["annotators"]}
    assert kappas["ann"] == pytest.approx(1.0)
    assert kappas["lazy"] is not None and kappas["lazy"] < 0.5
    assert body["krippendorff_alpha"] is not None and body["krippendorff_alpha"] < 1.0
    assert set(body["per_class"]) == {"adenocarcinoma", "benign", "squamous"}


def test_crowd_members_cannot_read_agreement_or_exports(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    crowd = api_client(Vote.objects.filter(project=project, role=Role.CROWD).first().annotator)
    assert crowd.get(f"/api/v1/projects/{project.pk}/agreement/").status_code == 403
    assert crowd.get(f"/api/v1/projects/{project.pk}/export/?format=csv&kind=votes").status_code == 403


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
    reports.recompute_project_consensus(project)
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
    project, patches, *_ = labelled
    reports.recompute_project_consensus(project)
    slide_id = patches[0].slide_id
    outsider = member(project, Role.CROWD)
    rows = api_client(outsider).get(f"/api/v1/projects/{project.pk}/overlay/?slide={slide_id}").json()["patches"]
    assert len(rows) == 6 and all(r["label"] is None for r in rows)
    expert_rows = (
        api_client(member(project, Role.EXPERT))
        .get(f"/api/v1/projects/{project.pk}/overlay/?slide={slide_id}")
        .json()["patches"]
    )
    assert all(r["label"] for r in expert_rows)
    assert Patch.objects.filter(project=project).count() == 6
