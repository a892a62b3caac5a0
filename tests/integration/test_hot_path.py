"""The annotator's hot path (next-task, vote): its query count, its answers, and what its caches forget.

The query counts are pinned so that a change adding a query per request fails here, not in a
benchmark weeks later. They count every statement Django sends, BEGIN and COMMIT included.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotations import member_cache, queue, voting
from annotations.models import AnnotationTask, LabelClass, Membership, Role, Vote
from annotations.serializers import TaskSerializer, VoteSerializer, task_data, vote_data
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member, queue_every_patch

pytestmark = pytest.mark.django_db

# Per request once the caller's credential and membership are remembered (annotations.member_cache).
NEXT_TASK_QUERIES = 5  # BEGIN, lock the user, held leases, pick + lease (one UPDATE), COMMIT
VOTE_QUERIES = 7  # labels, BEGIN, count the vote on the task, insert the vote, its patch's votes, consensus, COMMIT
# The first request of a credential also looks up the token's user and the membership with its project.
FIRST_REQUEST_EXTRA = 2


@pytest.fixture(autouse=True)
def fresh_member_cache() -> Iterator[None]:
    member_cache.entries.clear()
    yield
    member_cache.entries.clear()


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=3, gold_rate=0.0)
    slide = SlideFactory(project=project, name="case-7.svs")
    PatchFactory.create_batch(6, slide=slide)
    queue_every_patch(project)
    return project


def token_client(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def next_task(client: APIClient, project: Any) -> Any:
    return client.post(f"/api/v1/projects/{project.pk}/next-task/")


def vote(client: APIClient, project: Any, task: dict[str, Any], label: str = "benign") -> Any:
    body = {"patch": task["patch"]["id"], "task": task["id"], "label": label}
    return client.post(f"/api/v1/projects/{project.pk}/votes/", body, format="json")


def test_next_task_and_vote_send_a_pinned_number_of_queries(project) -> None:  # type: ignore[no-untyped-def]
    client = token_client(member(project, Role.CROWD))
    with CaptureQueriesContext(connection) as first:
        task = next_task(client, project).json()
    assert len(first) == NEXT_TASK_QUERIES + FIRST_REQUEST_EXTRA, [q["sql"][:80] for q in first]
    with CaptureQueriesContext(connection) as voted:
        assert vote(client, project, task).status_code == 201
    assert len(voted) == VOTE_QUERIES, [q["sql"][:80] for q in voted]
    for _ in range(3):
        with CaptureQueriesContext(connection) as leased:
            task = next_task(client, project).json()
        assert len(leased) == NEXT_TASK_QUERIES, [q["sql"][:80] for q in leased]
        with CaptureQueriesContext(connection) as voted:
            assert vote(client, project, task).status_code == 201
        assert len(voted) == VOTE_QUERIES, [q["sql"][:80] for q in voted]


def test_the_lease_and_the_vote_are_prepared_statements(project) -> None:  # type: ignore[no-untyped-def]
    """Server-side binding ($1 placeholders): psycopg prepares them, PostgreSQL plans them once per connection."""
    client = token_client(member(project, Role.CROWD))
    next_task(client, project)  # the first request also sends the ORM's lookups
    with CaptureQueriesContext(connection) as leased:
        task = next_task(client, project).json()
    with CaptureQueriesContext(connection) as voted:
        vote(client, project, task)
    transaction_words = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT")  # a test runs inside a transaction
    statements = [q["sql"] for q in [*leased, *voted] if not q["sql"].startswith(transaction_words)]
    assert statements and all("$1" in sql for sql in statements), statements


def test_the_fast_answers_are_the_serializers_answers(project) -> None:  # type: ignore[no-untyped-def]
    crowd, expert = member(project, Role.CROWD), member(project, Role.EXPERT)
    task = queue.lease_next_task(project, crowd, Role.CROWD)
    assert task is not None
    for role in (Role.CROWD, Role.EXPERT):
        assert task_data(task, role) == TaskSerializer(task, context={"role": role}).data
    # A gold check (and the gold flag) is hidden from the crowd, shown to experts, in both.
    gold = queue.held_leases(project, crowd)[0]
    gold.kind, gold.priority, gold.arm = AnnotationTask.Kind.GOLD, 0.7, "margin"
    gold.patch.is_gold = True
    for role in (Role.CROWD, Role.EXPERT):
        assert task_data(gold, role) == TaskSerializer(gold, context={"role": role}).data
    assert task_data(gold, Role.CROWD)["kind"] == "crowd" and task_data(gold, Role.EXPERT)["kind"] == "gold"
    outcome = voting.cast_vote(project, crowd, Role.CROWD, patch_id=task.patch_id, label="benign", task_id=task.pk)
    assert vote_data(outcome.vote) == VoteSerializer(outcome.vote).data
    stored = Vote.objects.select_related("annotator", "label").get(pk=outcome.vote.pk)
    assert vote_data(stored) == VoteSerializer(stored).data == vote_data(outcome.vote)
    # An expert's vote from the viewer, without a task.
    other = task.patch_id + 1
    expert_vote = voting.cast_vote(project, expert, Role.EXPERT, patch_id=other, label="squamous").vote
    assert vote_data(expert_vote) == VoteSerializer(Vote.objects.get(pk=expert_vote.pk)).data


def test_a_vote_that_is_refused_changes_nothing_and_says_why(project) -> None:  # type: ignore[no-untyped-def]
    alice, bob = member(project, Role.CROWD), member(project, Role.CROWD)
    a, b = token_client(alice), token_client(bob)
    task = next_task(a, project).json()
    other = next_task(b, project).json()
    before = list(AnnotationTask.objects.order_by("id").values_list("id", "state", "votes_received", "lease_owner"))
    answers = [
        (vote(a, project, {**task, "id": other["id"], "patch": other["patch"]}), 409, "expired or was never yours"),
        (vote(a, project, {**task, "patch": other["patch"]}), 400, "different patch"),
        (vote(a, project, {**task, "id": 10**12}), 400, "No such task"),
        (vote(a, project, task, label="nope"), 400, "Unknown label"),
    ]
    for response, status, words in answers:
        assert response.status_code == status and words in response.json()["detail"], response.content
    assert list(AnnotationTask.objects.order_by("id").values_list("id", "state", "votes_received", "lease_owner")) == (
        before
    )
    assert not Vote.objects.exists()
    assert vote(a, project, task).status_code == 201
    # A second vote on the same patch (a retried request, a race): 409, and the task keeps one vote.
    AnnotationTask.objects.filter(pk=task["id"]).update(
        state="leased", lease_owner=alice, lease_expires_at=timezone.now() + timedelta(minutes=5)
    )
    again = vote(a, project, task)
    assert again.status_code == 409 and "already voted" in again.json()["detail"]
    assert AnnotationTask.objects.get(pk=task["id"]).votes_received == 1
    assert Vote.objects.filter(annotator=alice).count() == 1


def test_a_removed_member_a_revoked_token_and_a_deactivated_user_are_refused_at_once(project) -> None:  # type: ignore[no-untyped-def]
    users = [member(project, Role.CROWD) for _ in range(3)]
    clients = [token_client(u) for u in users]
    for client in clients:
        assert next_task(client, project).status_code == 200  # now remembered
    Membership.objects.filter(user=users[0]).get().delete()
    assert next_task(clients[0], project).status_code == 404
    Token.objects.get(user=users[1]).delete()
    assert next_task(clients[1], project).status_code == 403
    users[2].is_active = False
    users[2].save()
    assert next_task(clients[2], project).status_code == 403


def test_a_changed_role_and_a_changed_project_setting_apply_to_the_next_request(project) -> None:  # type: ignore[no-untyped-def]
    user = member(project, Role.CROWD)
    client = token_client(user)
    first = next_task(client, project).json()
    assert first["kind"] == "crowd"
    project.lease_minutes = 42
    project.save()
    AnnotationTask.objects.filter(pk=first["id"]).update(state="open", lease_owner=None, lease_expires_at=None)
    again = next_task(client, project).json()
    expires = timezone.datetime.fromisoformat(again["lease_expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=41) < expires - timezone.now() <= timedelta(minutes=42)
    membership = Membership.objects.get(user=user, project=project)
    membership.role = Role.EXPERT
    membership.save()
    # An expert sees the gold flag; the crowd never does: the answer follows the new role.
    response = client.get(f"/api/v1/projects/{project.pk}/stats/")
    assert response.json()["role"] == Role.EXPERT
    assert "is_gold" in next_task(client, project).json()["patch"]
    assert member_cache.member_project(user, project.pk)[1] == Role.EXPERT


def test_another_process_changing_a_membership_clears_this_process_within_a_second(project, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The generation number in the shared cache is how another server process says "forget"."""
    user = member(project, Role.CROWD)
    client = token_client(user)
    assert next_task(client, project).status_code == 200
    monkeypatch.setattr(member_cache, "GENERATION_CHECK_SECONDS", 0.0)
    # Another process deleted the membership: the row is gone and the shared number moved, but no
    # signal ran here (QuerySet.delete of a raw SQL statement sends none).
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM annotations_membership WHERE user_id = %s", [user.pk])
    assert next_task(client, project).status_code == 200  # still remembered: nothing said otherwise
    if not cache.add(member_cache.GENERATION_KEY, 1, timeout=None):
        cache.incr(member_cache.GENERATION_KEY)
    assert next_task(client, project).status_code == 404


def test_a_remembered_session_still_needs_its_csrf_token(project) -> None:  # type: ignore[no-untyped-def]
    user = member(project, Role.CROWD, username="csrf-user")
    user.set_password("pw-for-the-test")
    user.save()
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="csrf-user", password="pw-for-the-test")
    assert client.get(f"/api/v1/projects/{project.pk}/stats/").status_code == 200  # now remembered
    refused = next_task(client, project)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    client.get("/")  # a page sets the CSRF cookie, as in the browser
    token = client.cookies["csrftoken"].value
    accepted = client.post(f"/api/v1/projects/{project.pk}/next-task/", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 200, accepted.content
    client.logout()
    assert next_task(client, project).status_code == 403


def test_labels_are_read_per_vote_so_a_new_label_is_usable_at_once(project) -> None:  # type: ignore[no-untyped-def]
    client = token_client(member(project, Role.CROWD))
    task = next_task(client, project).json()
    LabelClass.objects.create(project=project, name="necrosis", hotkey="9", order=9)
    response = vote(client, project, task, label="necrosis")
    assert response.status_code == 201 and response.json()["vote"]["label_name"] == "necrosis"
