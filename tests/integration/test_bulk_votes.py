"""Bulk labelling through the REST API on real PostgreSQL: one action, one transaction, undone as one, for
experts and admins only, and hostile input refused with nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from annotations.bulk_voting import MAX_BULK_PATCHES
from annotations.consensus import recompute_consensus
from annotations.models import Consensus, LabelClass, Patch, Role, Vote, VoteBatch
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=1, gold_rate=0.0)
    PatchFactory.create_batch(40, slide=SlideFactory(project=project))
    return project


def url(project: Any, tail: str = "") -> str:
    return f"/api/v1/projects/{project.pk}/votes/bulk/{tail}"


def ids_of(project: Any) -> list[int]:
    return list(Patch.objects.filter(project=project).order_by("id").values_list("pk", flat=True))


def consensus_of(project: Any) -> dict[int, tuple[Any, str, int]]:
    rows = Consensus.objects.filter(project=project).values_list("patch_id", "label_id", "status", "vote_count")
    return {pid: (label, status, n) for pid, label, status, n in rows}


def test_an_expert_labels_a_selection_but_the_clicked_ones_in_one_action_and_undoes_it_as_one(project) -> None:  # type: ignore[no-untyped-def]
    expert, crowd = member(project, Role.EXPERT), member(project, Role.CROWD)
    benign = LabelClass.objects.get(project=project, name="benign")
    malignant = LabelClass.objects.get(project=project, name="adenocarcinoma")
    ids = ids_of(project)
    # Before: the expert had labelled patch 0 malignant and patch 1 benign; a student had voted on patch 2.
    Vote.objects.create(project=project, patch_id=ids[0], annotator=expert, label=malignant, role=Role.EXPERT)
    Vote.objects.create(project=project, patch_id=ids[1], annotator=expert, label=benign, role=Role.EXPERT)
    Vote.objects.create(project=project, patch_id=ids[2], annotator=crowd, label=malignant, role=Role.CROWD)
    for pid in ids[:3]:
        recompute_consensus(project, pid)
    before = consensus_of(project)

    client = api_client(expert)
    with CaptureQueriesContext(connection) as queries:
        response = client.post(
            url(project), {"patches": ids[:30], "exclude": ids[25:30], "label": "benign"}, format="json"
        )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["created"], body["corrected"], body["unchanged"]) == (24, 1, 1)
    assert body["batch"]["n_patches"] == 25 and body["batch"]["label_name"] == "benign"
    # Bulk, not one transaction per patch: a bounded number of queries for 25 patches.
    assert len(queries) < 30, [q["sql"][:80] for q in queries.captured_queries]
    batch = VoteBatch.objects.get(pk=body["batch"]["id"])
    assert Vote.objects.filter(batch=batch, is_active=True).count() == 24
    assert set(Vote.objects.filter(batch=batch).values_list("provenance", flat=True)) == {"bulk"}
    assert not Vote.objects.get(patch_id=ids[0], label=malignant).is_active  # superseded, kept
    after = consensus_of(project)
    assert all(after[pid][0] == benign.pk and after[pid][1] == "expert" for pid in ids[:25])
    assert all(pid not in after for pid in ids[25:])  # the excluded and unselected are untouched

    # The same action again is refused while the first stands.
    again = client.post(url(project), {"patches": ids[:30], "exclude": ids[25:30], "label": "benign"}, format="json")
    assert again.status_code == 409 and f"action {batch.pk}" in again.json()["detail"]

    undo = client.post(url(project, f"{batch.pk}/undo/"))
    assert undo.status_code == 200, undo.content
    assert (undo.json()["retracted"], undo.json()["restored"], undo.json()["skipped"]) == (24, 1, 0)
    restored = consensus_of(project)
    for pid, row in before.items():
        assert restored[pid] == row, pid  # every patch's consensus is what it was
    assert all(restored[pid][1] == "pending" for pid in ids[3:25])
    back = Vote.objects.filter(patch_id=ids[0], annotator=expert, is_active=True).get()
    assert (back.label, back.provenance) == (malignant, "manual")  # the earlier vote, as it came in
    assert client.post(url(project, f"{batch.pk}/undo/")).status_code == 409
    # Undone, the same action may be done again.
    redo = client.post(url(project), {"patches": ids[:30], "exclude": ids[25:30], "label": "benign"}, format="json")
    assert redo.status_code == 201


def test_crowd_members_and_outsiders_cannot_label_in_bulk_or_undo_others(project) -> None:  # type: ignore[no-untyped-def]
    ids = ids_of(project)
    crowd, expert, admin = member(project, Role.CROWD), member(project, Role.EXPERT), member(project, Role.ADMIN)
    outsider = member(ProjectFactory(), Role.ADMIN)
    body = {"patches": ids[:5], "label": "benign"}
    assert api_client(crowd).post(url(project), body, format="json").status_code == 403
    assert api_client(outsider).post(url(project), body, format="json").status_code == 404
    made = api_client(expert).post(url(project), body, format="json")
    assert made.status_code == 201
    batch = made.json()["batch"]["id"]
    assert api_client(admin).post(url(project), body, format="json").status_code == 201  # an admin's own action
    assert api_client(crowd).post(url(project, f"{batch}/undo/")).status_code == 403
    response = api_client(admin).post(url(project, f"{batch}/undo/"))
    assert response.status_code == 403 and "who made" in response.json()["detail"]
    assert api_client(outsider).post(url(project, f"{batch}/undo/")).status_code == 404
    assert api_client(expert).post(url(project, "999999999/undo/")).status_code == 404
    assert Vote.objects.filter(project=project, is_active=True).count() == 10


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"patches": [], "label": "benign"}, "patches"),
        ({"patches": "1,2,3", "label": "benign"}, "patches"),
        ({"patches": [1, "x"], "label": "benign"}, "patches"),
        ({"patches": [-4], "label": "benign"}, "patches"),
        ({"patches": [2**70], "label": "benign"}, "patches"),
        ({"patches": [1], "label": "no-such-label"}, "Unknown label"),
        ({"patches": [1]}, "label"),
        ({"patches": list(range(1, MAX_BULK_PATCHES + 2)), "label": "benign"}, f"{MAX_BULK_PATCHES}"),
    ],
)
def test_hostile_bulk_input_gets_a_clear_400_and_changes_nothing(project, body, needle) -> None:  # type: ignore[no-untyped-def]
    client = api_client(member(project, Role.EXPERT))
    if body.get("patches") == [1]:
        body = {**body, "patches": ids_of(project)[:1]}
    response = client.post(url(project), body, format="json")
    assert response.status_code == 400, response.content
    assert needle in str(response.json())
    assert not Vote.objects.exists() and not VoteBatch.objects.exists()


def test_patches_of_another_project_or_unknown_ids_refuse_the_whole_action(project) -> None:  # type: ignore[no-untyped-def]
    other = ProjectFactory()
    foreign = PatchFactory(slide=SlideFactory(project=other))
    client = api_client(member(project, Role.EXPERT))
    mixed = [*ids_of(project)[:5], foreign.pk, 987654321]
    response = client.post(url(project), {"patches": mixed, "label": "benign"}, format="json")
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "2 of the selected patches are not in this project" in detail and str(foreign.pk) in detail
    assert not Vote.objects.exists() and not VoteBatch.objects.exists() and not Consensus.objects.exists()
    everything = ids_of(project)
    response = client.post(
        url(project), {"patches": everything, "exclude": everything, "label": "benign"}, format="json"
    )
    assert response.status_code == 400 and "No patches are left" in response.json()["detail"]


def test_a_bulk_action_over_patches_already_so_labelled_is_refused_as_nothing_to_do(project) -> None:  # type: ignore[no-untyped-def]
    expert = member(project, Role.EXPERT)
    benign = LabelClass.objects.get(project=project, name="benign")
    ids = ids_of(project)[:3]
    for pid in ids:
        Vote.objects.create(project=project, patch_id=pid, annotator=expert, label=benign, role=Role.EXPERT)
    response = api_client(expert).post(url(project), {"patches": ids, "label": benign.pk}, format="json")
    assert response.status_code == 409 and "nothing to do" in response.json()["detail"]
