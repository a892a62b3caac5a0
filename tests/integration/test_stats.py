"""Project counters (annotations.stats): right, shared from the cache, and a person's own counts live."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from annotations.models import Role
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member, queue_every_patch

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    PatchFactory.create_batch(5, slide=SlideFactory(project=project))
    queue_every_patch(project)
    return project


def test_the_counters_count_and_a_second_view_within_seconds_scans_nothing(project) -> None:  # type: ignore[no-untyped-def]
    expert = api_client(member(project, Role.EXPERT))
    url = f"/api/v1/projects/{project.pk}/stats/"
    first = expert.get(url).json()
    assert first["queue"]["open"] == 5 and first["patches"] == 5 and first["votes"] == 0
    with CaptureQueriesContext(connection) as queries:
        again = expert.get(url).json()
    assert again["queue"] == first["queue"] and again["patches"] == 5
    counted = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    # Only the caller's own two counts run; the project-wide ones come from the cache.
    assert len(counted) == 2 and all("annotator_id" in sql for sql in counted)


def test_a_persons_own_counts_follow_each_vote_at_once(project) -> None:  # type: ignore[no-untyped-def]
    student = api_client(member(project, Role.CROWD))
    url = f"/api/v1/projects/{project.pk}/stats/"
    assert student.get(url).json()["my_votes_total"] == 0
    task = student.post(f"/api/v1/projects/{project.pk}/next-task/").json()
    body = {"patch": task["patch"]["id"], "task": task["id"], "label": "benign"}
    assert student.post(f"/api/v1/projects/{project.pk}/votes/", body, format="json").status_code == 201
    shown = student.get(url).json()
    assert shown["my_votes_total"] == 1 and shown["my_votes_today"] == 1
    assert "votes" not in shown  # project-wide label counts are for experts and admins


def test_the_annotation_cost_prices_every_vote_cast_at_the_projects_costs(project) -> None:  # type: ignore[no-untyped-def]
    from annotations import queue, voting
    from annotations.models import Project

    admin = api_client(member(project, Role.ADMIN))
    assert admin.patch(f"/api/v1/projects/{project.pk}/", {"expert_cost": 12, "crowd_cost": 0.5}).status_code == 200
    project.refresh_from_db()
    students = [member(project, Role.CROWD) for _ in range(3)]
    for user in students:
        task = queue.lease_next_task(project, user, Role.CROWD)
        assert task is not None
        voting.cast_vote(project, user, Role.CROWD, patch_id=task.patch_id, label="benign", task_id=task.pk)
    expert = member(project, Role.EXPERT)
    outcome = voting.cast_vote(project, expert, Role.EXPERT, patch_id=task.patch_id, label="squamous")
    voting.correct_vote(project, expert, Role.EXPERT, vote_id=outcome.vote.pk, label="benign")  # paid twice
    voting.undo_last_vote(project, students[0])  # an undone vote was paid for too
    body = admin.get(f"/api/v1/projects/{project.pk}/stats/").json()
    assert body["votes_cast"] == {"crowd": 3, "expert": 2}
    assert body["annotation_cost"] == 3 * 0.5 + 2 * 12
    # A new price applies at once, though the counts come from the cache.
    Project.objects.filter(pk=project.pk).update(expert_cost=1.0)
    assert admin.get(f"/api/v1/projects/{project.pk}/stats/").json()["annotation_cost"] == 3 * 0.5 + 2 * 1.0
