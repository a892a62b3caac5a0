"""Adaptive redundancy (issue 15): with the project setting on, a crowd patch stops collecting votes once its
consensus is confident, collects more while it is split, and never more than ``votes_required``; off (the
default), every patch gets ``votes_required`` votes as before. Through the REST API on real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from annotations import bulk_voting, consensus, member_cache, queue, voting
from annotations.models import AnnotationTask, Consensus, Project, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member, queue_every_patch
from tests.integration.test_hot_path import VOTE_QUERIES, token_client

pytestmark = pytest.mark.django_db


def make_project(**fields: Any) -> Project:
    project = ProjectFactory(**{"votes_required": 3, "gold_rate": 0.0, **fields})
    PatchFactory.create_batch(1, slide=SlideFactory(project=project))
    queue_every_patch(project)
    return project


def next_task(client: APIClient, project: Project) -> Any:
    return client.post(f"/api/v1/projects/{project.pk}/next-task/")


def vote_on_next(client: APIClient, project: Project, label: str) -> None:
    task = next_task(client, project).json()
    body = {"patch": task["patch"]["id"], "task": task["id"], "label": label}
    response = client.post(f"/api/v1/projects/{project.pk}/votes/", body, format="json")
    assert response.status_code == 201, response.content


def students(project: Project, n: int) -> list[APIClient]:
    return [api_client(member(project, Role.CROWD)) for _ in range(n)]


def the_task(project: Project) -> AnnotationTask:
    return AnnotationTask.objects.get(project=project, kind="crowd")


def test_two_agreeing_students_settle_a_patch_and_the_third_gets_no_task() -> None:
    project = make_project(adaptive_redundancy=True, redundancy_confidence=0.9)
    a, b, c = students(project, 3)
    vote_on_next(a, project, "benign")
    assert the_task(project).state == "open"  # one vote is never enough
    vote_on_next(b, project, "benign")
    task = the_task(project)
    assert (task.state, task.votes_received, task.votes_needed) == ("done", 2, 3)
    row = Consensus.objects.get(patch=task.patch)
    assert (row.status, row.label.name, row.vote_count) == ("agreed", "benign", 2)
    assert next_task(c, project).status_code == 204
    # A round choosing the patch again does not queue it for the crowd: it is settled.
    assert queue.enqueue_patches(project, {task.patch_id: 5.0}) == 0


def test_a_split_asks_for_more_votes_up_to_the_cap() -> None:
    project = make_project(adaptive_redundancy=True, redundancy_confidence=0.9)
    a, b, c, d = students(project, 4)
    vote_on_next(a, project, "benign")
    vote_on_next(b, project, "squamous")
    assert the_task(project).state == "open"
    assert Consensus.objects.get(patch=the_task(project).patch).status == "pending"
    vote_on_next(c, project, "benign")  # 2 : 1, the third vote is the cap
    task = the_task(project)
    assert (task.state, task.votes_received) == ("done", 3)
    assert Consensus.objects.get(patch=task.patch).status == "agreed"
    assert next_task(d, project).status_code == 204


def test_off_by_default_every_patch_gets_votes_required_votes() -> None:
    project = make_project()
    assert project.adaptive_redundancy is False
    a, b, c = students(project, 3)
    vote_on_next(a, project, "benign")
    vote_on_next(b, project, "benign")
    assert the_task(project).state == "open"
    assert Consensus.objects.get(patch=the_task(project).patch).status == "pending"
    vote_on_next(c, project, "benign")
    assert the_task(project).state == "done"


def test_a_higher_threshold_keeps_asking_until_the_cap() -> None:
    project = make_project(adaptive_redundancy=True, redundancy_confidence=0.9, votes_required=5)
    clients = students(project, 5)
    for client in clients[:2]:
        vote_on_next(client, project, "benign")
    # 2 : 0 settles it below the cap of 5; the third student finds nothing to do.
    assert the_task(project).state == "done" and the_task(project).votes_received == 2
    assert next_task(clients[2], project).status_code == 204
    split = make_project(adaptive_redundancy=True, redundancy_confidence=0.9, votes_required=5)
    clients = students(split, 5)
    for client, label in zip(clients, ["benign", "squamous", "benign", "benign", "benign"], strict=True):
        vote_on_next(client, split, label)
        if the_task(split).state == "done":
            break
    # 1:1, 2:1 (0.67), 3:1 (0.75), 4:1 (0.8): never 0.9, so all five votes were asked for.
    assert the_task(split).votes_received == 5


def test_the_vote_that_settles_a_patch_costs_no_query_more() -> None:
    project = make_project(adaptive_redundancy=True, redundancy_confidence=0.9)
    member_cache.entries.clear()
    a, b = (token_client(member(project, Role.CROWD)) for _ in range(2))
    vote_on_next(a, project, "benign")
    task = next_task(b, project).json()
    body = {"patch": task["patch"]["id"], "task": task["id"], "label": "benign"}
    with CaptureQueriesContext(connection) as voted:
        assert b.post(f"/api/v1/projects/{project.pk}/votes/", body, format="json").status_code == 201
    assert len(voted) == VOTE_QUERIES, [q["sql"][:80] for q in voted]
    assert the_task(project).state == "done"
    # The closing upsert is a prepared statement like the others.
    assert any("WITH closed AS" in q["sql"] and "$1" in q["sql"] for q in voted)
    member_cache.entries.clear()


def test_an_expert_label_from_the_viewer_closes_the_crowd_task() -> None:
    project = make_project(adaptive_redundancy=True)
    a = students(project, 1)[0]
    vote_on_next(a, project, "benign")
    expert = member(project, Role.EXPERT)
    voting.cast_vote(project, expert, Role.EXPERT, patch_id=the_task(project).patch_id, label="squamous")
    assert the_task(project).state == "done"
    # Without the setting the crowd task stays open beside the expert's label, as before.
    fixed = make_project()
    vote_on_next(students(fixed, 1)[0], fixed, "benign")
    voting.cast_vote(fixed, member(fixed, Role.EXPERT), Role.EXPERT, patch_id=the_task(fixed).patch_id, label="benign")
    assert the_task(fixed).state == "open"


def test_a_leased_task_is_left_to_its_holder() -> None:
    project = make_project(adaptive_redundancy=True)
    a, b, c = (member(project, Role.CROWD) for _ in range(3))
    first = queue.lease_next_task(project, a, Role.CROWD)
    assert first is not None
    voting.cast_vote(project, a, Role.CROWD, patch_id=first.patch_id, label="benign", task_id=first.pk)
    held = queue.lease_next_task(project, c, Role.CROWD)
    assert held is not None
    # An expert settles the patch while c holds the lease: c's lease stands and c's vote still counts.
    voting.cast_vote(project, member(project, Role.EXPERT), Role.EXPERT, patch_id=held.patch_id, label="benign")
    assert the_task(project).state == "leased"
    outcome = voting.cast_vote(project, c, Role.CROWD, patch_id=held.patch_id, label="benign", task_id=held.pk)
    assert outcome.task is not None and outcome.task.state == "done"
    assert the_task(project).state == "done"
    assert queue.lease_next_task(project, b, Role.CROWD) is None


def test_undo_of_the_settling_vote_gives_the_task_back() -> None:
    project = make_project(adaptive_redundancy=True)
    a, b = (member(project, Role.CROWD) for _ in range(2))
    for user in (a, b):
        task = queue.lease_next_task(project, user, Role.CROWD)
        assert task is not None
        voting.cast_vote(project, user, Role.CROWD, patch_id=task.patch_id, label="benign", task_id=task.pk)
    assert the_task(project).state == "done"
    back = voting.undo_last_vote(project, b)
    assert back is not None and back.state == "leased" and back.lease_owner_id == b.pk
    assert Consensus.objects.get(patch_id=back.patch_id).status == "pending"


def test_a_bulk_label_and_a_batch_recompute_close_the_tasks_they_settle() -> None:
    project = ProjectFactory(votes_required=3, gold_rate=0.0, adaptive_redundancy=True)
    patches = PatchFactory.create_batch(3, slide=SlideFactory(project=project))
    queue_every_patch(project)
    expert = member(project, Role.EXPERT)
    bulk_voting.cast_bulk_votes(project, expert, Role.EXPERT, patch_ids=[patches[0].pk], label="benign")
    open_ = AnnotationTask.objects.filter(project=project, kind="crowd", state="open")
    assert set(open_.values_list("patch_id", flat=True)) == {patches[1].pk, patches[2].pk}
    # Two students agree on patch 1 with adaptive redundancy off, then the project turns it on: the next
    # batch recompute settles the patch and closes its task.
    Project.objects.filter(pk=project.pk).update(adaptive_redundancy=False)
    project.refresh_from_db()
    for _ in range(2):
        user = member(project, Role.CROWD)
        task = AnnotationTask.objects.get(patch=patches[1], kind="crowd")
        task.lease(user, task.updated_at.replace(year=2100))
        voting.cast_vote(project, user, Role.CROWD, patch_id=patches[1].pk, label="squamous", task_id=task.pk)
    assert AnnotationTask.objects.get(patch=patches[1], kind="crowd").state == "open"
    Project.objects.filter(pk=project.pk).update(adaptive_redundancy=True, consensus_method="majority")
    project.refresh_from_db()
    consensus.recompute_project_consensus(project)
    assert AnnotationTask.objects.get(patch=patches[1], kind="crowd").state == "done"
    assert AnnotationTask.objects.get(patch=patches[2], kind="crowd").state == "open"
    assert Vote.objects.filter(project=project).count() == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("redundancy_confidence", 0.3), ("redundancy_confidence", 1.5), ("adaptive_redundancy", "maybe")],
)
def test_bad_redundancy_settings_are_refused_and_change_nothing(field: str, value: Any) -> None:
    project = make_project()
    admin = api_client(member(project, Role.ADMIN))
    response = admin.patch(f"/api/v1/projects/{project.pk}/", {field: value}, format="json")
    assert response.status_code == 400 and field in response.json(), response.content
    fresh = Project.objects.get(pk=project.pk)
    assert (fresh.adaptive_redundancy, fresh.redundancy_confidence) == (False, 0.9)


def test_an_admin_turns_it_on_through_the_api_and_the_next_vote_uses_it() -> None:
    project = make_project()
    admin = api_client(member(project, Role.ADMIN))
    body = {"adaptive_redundancy": True, "redundancy_confidence": 0.95}
    response = admin.patch(f"/api/v1/projects/{project.pk}/", body, format="json")
    assert response.status_code == 200 and response.json()["adaptive_redundancy"] is True
    assert response.json()["redundancy_confidence"] == 0.95
    a, b = students(project, 2)
    vote_on_next(a, project, "benign")
    vote_on_next(b, project, "benign")
    assert the_task(project).state == "done"


def test_a_batch_recompute_that_finds_a_patch_unsure_reopens_its_task_for_another_vote() -> None:
    project = ProjectFactory(votes_required=3, gold_rate=0.0, adaptive_redundancy=True, consensus_method="dawid_skene")
    slide = SlideFactory(project=project)
    gold = PatchFactory.create_batch(9, slide=slide, is_gold=True)
    target = PatchFactory(slide=slide)
    queue.enqueue_patches(project, {target.pk: 1.0})
    names = ["adenocarcinoma", "benign", "squamous"]
    expert = member(project, Role.EXPERT)
    s1, s2, s3 = (member(project, Role.CROWD) for _ in range(3))
    for i, patch in enumerate(gold):
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=names[i // 3])
        for student in (s1, s2):  # every answer for every true class: these two tell nothing
            voting.cast_vote(
                project, student, Role.CROWD, patch_id=patch.pk, label=names[i % 3], crowd_without_task=True
            )
    for student in (s1, s2):
        task = queue.lease_next_task(project, student, Role.CROWD)
        assert task is not None and task.patch_id == target.pk
        voting.cast_vote(project, student, Role.CROWD, patch_id=target.pk, label="benign", task_id=task.pk)
    assert the_task(project).state == "done"  # two agreeing votes: the per-vote count is sure
    consensus.recompute_project_consensus(project)
    row = Consensus.objects.get(patch=target)
    assert row.status == "pending" and row.confidence == 0.0  # Dawid-Skene is not: they are unreliable
    assert the_task(project).state == "open"
    again = queue.lease_next_task(project, s3, Role.CROWD)
    assert again is not None and again.pk == the_task(project).pk
    voting.cast_vote(project, s3, Role.CROWD, patch_id=target.pk, label="benign", task_id=again.pk)
    assert the_task(project).state == "done" and the_task(project).votes_received == 3  # the cap
