"""The queue and votes through the REST API, on real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from annotations import queue
from annotations.models import AnnotationTask, Consensus, Patch, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member, queue_every_patch

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    slide = SlideFactory(project=project)
    PatchFactory.create_batch(4, slide=slide)
    queue_every_patch(project)
    return project


def lease(client: APIClient, project) -> dict:  # type: ignore[no-untyped-def]
    response = client.post(f"/api/v1/projects/{project.pk}/next-task/")
    assert response.status_code == 200, response.content
    return response.json()


def vote(client: APIClient, project, task: dict, label: str = "benign"):  # type: ignore[no-untyped-def]
    return client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": task["patch"]["id"], "task": task["id"], "label": label, "time_spent_ms": 1200},
        format="json",
    )


def test_it_leases_the_highest_priority_task_and_returns_the_same_lease_when_asked_again(project) -> None:  # type: ignore[no-untyped-def]
    client = api_client(member(project, Role.CROWD))
    first = lease(client, project)
    top = AnnotationTask.objects.filter(project=project).order_by("-priority").first()
    assert first["id"] == top.pk
    assert lease(client, project)["id"] == first["id"]
    assert AnnotationTask.objects.filter(state="leased").count() == 1


def test_it_never_gives_two_annotators_the_same_lease(project) -> None:  # type: ignore[no-untyped-def]
    ids = {lease(api_client(member(project, Role.CROWD)), project)["id"] for _ in range(4)}
    assert len(ids) == 4


def test_a_crowd_patch_collects_votes_from_different_people_and_nobody_sees_it_twice(project) -> None:  # type: ignore[no-untyped-def]
    alice, bob = member(project, Role.CROWD), member(project, Role.CROWD)
    a, b = api_client(alice), api_client(bob)
    task = lease(a, project)
    assert vote(a, project, task).status_code == 201
    seen_by_alice = set()
    for _ in range(3):
        t = lease(a, project)
        seen_by_alice.add(t["patch"]["id"])
        assert vote(a, project, t).status_code == 201
    assert task["patch"]["id"] not in seen_by_alice
    assert a.post(f"/api/v1/projects/{project.pk}/next-task/").status_code == 204
    # Bob gets the patches Alice voted on, each needing one more vote.
    t = lease(b, project)
    assert vote(b, project, t).status_code == 201
    done = AnnotationTask.objects.get(pk=t["id"])
    assert done.state == "done" and done.votes_received == 2


def test_it_rejects_a_second_vote_from_the_same_annotator(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.EXPERT)
    client = api_client(alice)
    patch = Patch.objects.filter(project=project).first()
    first = client.post(f"/api/v1/projects/{project.pk}/votes/", {"patch": patch.pk, "label": "benign"}, format="json")
    assert first.status_code == 201
    second = client.post(
        f"/api/v1/projects/{project.pk}/votes/", {"patch": patch.pk, "label": "squamous"}, format="json"
    )
    assert second.status_code == 409
    assert "already voted" in second.json()["detail"]
    assert Vote.objects.filter(patch=patch).count() == 1


def test_it_rejects_unknown_labels_foreign_patches_and_crowd_votes_without_a_lease(project) -> None:  # type: ignore[no-untyped-def]
    crowd = api_client(member(project, Role.CROWD))
    task = lease(crowd, project)
    unknown = vote(crowd, project, task, label="melanoma")
    assert unknown.status_code == 400 and "Unknown label" in unknown.json()["detail"]
    other_patch = PatchFactory(slide=SlideFactory(project=ProjectFactory()))
    foreign = crowd.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": other_patch.pk, "task": task["id"], "label": "benign"},
        format="json",
    )
    assert foreign.status_code == 400
    no_lease = crowd.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": task["patch"]["id"], "label": "benign"},
        format="json",
    )
    assert no_lease.status_code == 409 and "leased task" in no_lease.json()["detail"]
    assert Vote.objects.count() == 0


def test_an_expired_lease_returns_to_the_pool_and_cannot_be_voted_on(project) -> None:  # type: ignore[no-untyped-def]
    alice, bob = api_client(member(project, Role.CROWD)), api_client(member(project, Role.CROWD))
    task = lease(alice, project)
    AnnotationTask.objects.filter(pk=task["id"]).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert lease(bob, project)["id"] == task["id"]
    late = vote(alice, project, task)
    assert late.status_code == 409 and "expired" in late.json()["detail"]


def test_skip_releases_the_task_to_the_pool(project) -> None:  # type: ignore[no-untyped-def]
    alice, bob = api_client(member(project, Role.CROWD)), api_client(member(project, Role.CROWD))
    task = lease(alice, project)
    assert alice.post(f"/api/v1/projects/{project.pk}/tasks/{task['id']}/skip/").status_code == 200
    assert lease(bob, project)["id"] == task["id"]
    assert alice.post(f"/api/v1/projects/{project.pk}/tasks/{task['id']}/skip/").status_code == 409


def test_a_skipped_task_is_not_offered_straight_back_to_the_same_person(project) -> None:  # type: ignore[no-untyped-def]
    alice = api_client(member(project, Role.CROWD))
    task = lease(alice, project)
    alice.post(f"/api/v1/projects/{project.pk}/tasks/{task['id']}/skip/")
    assert lease(alice, project)["id"] != task["id"]


def test_a_vote_can_bring_the_next_lease_back_in_the_same_response(project) -> None:  # type: ignore[no-untyped-def]
    alice = api_client(member(project, Role.CROWD))
    task = lease(alice, project)
    response = alice.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": task["patch"]["id"], "task": task["id"], "label": "benign", "next": True},
        format="json",
    )
    assert response.status_code == 201
    following = response.json()["next"]
    assert following["id"] != task["id"] and following["state"] == "leased"
    assert AnnotationTask.objects.get(pk=following["id"]).lease_owner_id == response.wsgi_request.user.pk
    assert following["patch"]["context_url"].endswith(f"?context={project.patch_size}")


def test_undo_retracts_the_last_vote_keeps_history_and_gives_the_patch_back(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.CROWD)
    client = api_client(alice)
    task = lease(client, project)
    assert vote(client, project, task, "benign").status_code == 201
    undone = client.post(f"/api/v1/projects/{project.pk}/votes/undo/")
    assert undone.status_code == 200
    again = undone.json()["task"]
    assert again["patch"]["id"] == task["patch"]["id"]
    assert vote(client, project, again, "squamous").status_code == 201
    votes = Vote.objects.filter(patch_id=task["patch"]["id"], annotator=alice).order_by("id")
    assert [(v.label.name, v.is_active, v.retracted_at is not None) for v in votes] == [
        ("benign", False, True),
        ("squamous", True, False),
    ]


def test_a_correction_supersedes_the_previous_vote(project) -> None:  # type: ignore[no-untyped-def]
    expert = member(project, Role.EXPERT)
    client = api_client(expert)
    patch = Patch.objects.filter(project=project).first()
    first = client.post(f"/api/v1/projects/{project.pk}/votes/", {"patch": patch.pk, "label": "benign"}, format="json")
    vote_id = first.json()["vote"]["id"]
    fixed = client.post(f"/api/v1/projects/{project.pk}/votes/{vote_id}/correct/", {"label": "squamous"}, format="json")
    assert fixed.status_code == 201
    assert fixed.json()["vote"]["supersedes"] == vote_id
    consensus = Consensus.objects.get(patch=patch)
    assert consensus.label.name == "squamous" and consensus.status == "expert"


def test_contested_crowd_votes_queue_an_expert_review(project) -> None:  # type: ignore[no-untyped-def]
    a, b = api_client(member(project, Role.CROWD)), api_client(member(project, Role.CROWD))
    task = lease(a, project)
    vote(a, project, task, "benign")
    task_b = lease(b, project)
    assert task_b["patch"]["id"] == task["patch"]["id"]
    vote(b, project, task_b, "squamous")
    consensus = Consensus.objects.get(patch_id=task["patch"]["id"])
    assert consensus.status == "contested"
    expert = api_client(member(project, Role.EXPERT))
    review = lease(expert, project)
    assert review["kind"] == "expert" and review["patch"]["id"] == task["patch"]["id"]


def test_crowd_members_see_neither_others_votes_nor_consensus_before_voting(project) -> None:  # type: ignore[no-untyped-def]
    a = api_client(member(project, Role.CROWD))
    task = lease(a, project)
    vote(a, project, task, "benign")
    b = api_client(member(project, Role.CROWD))
    body = b.get(f"/api/v1/projects/{project.pk}/patches/{task['patch']['id']}/").json()
    assert body["votes"] == [] and body["consensus"] is None
    expert = api_client(member(project, Role.EXPERT))
    body = expert.get(f"/api/v1/projects/{project.pk}/patches/{task['patch']['id']}/").json()
    assert len(body["votes"]) == 1
    assert body["consensus"]["status"] == "pending" and body["consensus"]["vote_count"] == 1


def test_gold_patches_are_mixed_into_the_crowd_queue_and_training_mode_shows_the_answer(project) -> None:  # type: ignore[no-untyped-def]
    project.gold_rate = 1.0
    project.training_mode = True
    project.save()
    admin = api_client(member(project, Role.ADMIN))
    patch = Patch.objects.filter(project=project).last()
    admin.post(f"/api/v1/projects/{project.pk}/votes/", {"patch": patch.pk, "label": "squamous"}, format="json")
    assert admin.post(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/gold/").status_code == 200
    student = api_client(member(project, Role.CROWD))
    task = lease(student, project)
    # A gold check looks like any crowd task to the student (blind), but it is one.
    assert task["kind"] == "crowd" and task["patch"]["id"] == patch.pk
    assert AnnotationTask.objects.get(pk=task["id"]).kind == AnnotationTask.Kind.GOLD
    body = vote(student, project, task, "benign").json()
    assert body["gold"] == {"correct": False, "expert_label": "squamous"}


def test_only_patches_with_an_expert_label_can_become_gold(project) -> None:  # type: ignore[no-untyped-def]
    admin = api_client(member(project, Role.ADMIN))
    patch = Patch.objects.filter(project=project).first()
    response = admin.post(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/gold/")
    assert response.status_code == 409
    assert not Patch.objects.get(pk=patch.pk).is_gold


def test_a_label_with_votes_cannot_be_deleted_but_its_project_can(project) -> None:  # type: ignore[no-untyped-def]
    admin = api_client(member(project, Role.ADMIN))
    patch = Patch.objects.filter(project=project).first()
    admin.post(f"/api/v1/projects/{project.pk}/votes/", {"patch": patch.pk, "label": "benign"}, format="json")
    benign = project.label_classes.get(name="benign")
    response = admin.delete(f"/api/v1/projects/{project.pk}/labels/{benign.pk}/")
    assert response.status_code == 409 and "has votes" in response.json()["detail"]
    project.delete()
    assert not Vote.objects.filter(patch=patch).exists()


def test_an_ingested_slide_puts_its_patches_in_the_crowd_queue() -> None:
    from annotations.slides import ingest
    from tests.conftest import SLIDES_DIR

    project = ProjectFactory()
    slide = ingest.add_slide_from_path(project, SLIDES_DIR / "cmu-1-small-region.svs", launch=False)
    ingest.ingest(slide.pk)
    patches = set(Patch.objects.filter(slide=slide).values_list("pk", flat=True))
    queued = set(AnnotationTask.objects.filter(project=project, kind="crowd").values_list("patch_id", flat=True))
    assert patches and queued == patches
    ingest.ingest(slide.pk)  # re-running ingest does not queue anything twice
    assert AnnotationTask.objects.filter(project=project).count() == len(patches)


def lease_with_ahead(client: APIClient, project) -> dict:  # type: ignore[no-untyped-def]
    response = client.post(f"/api/v1/projects/{project.pk}/next-task/?ahead=1")
    assert response.status_code == 200, response.content
    return response.json()


def held_by(user) -> set[int]:  # type: ignore[no-untyped-def]
    return set(
        AnnotationTask.objects.filter(
            lease_owner=user, state="leased", lease_expires_at__gte=timezone.now()
        ).values_list("id", flat=True)
    )


def test_next_task_with_ahead_leases_a_second_different_task_and_returns_both_again(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.CROWD)
    client = api_client(alice)
    body = lease_with_ahead(client, project)
    ahead = body["ahead"]
    assert ahead is not None and ahead["id"] != body["id"]
    assert ahead["patch"]["id"] != body["patch"]["id"] and ahead["state"] == "leased"
    assert held_by(alice) == {body["id"], ahead["id"]}
    # Asking again (a reload) returns the same two leases, not a third.
    again = lease_with_ahead(client, project)
    assert (again["id"], again["ahead"]["id"]) == (body["id"], ahead["id"])
    # Without ?ahead the answer is unchanged: the held lease, and no "ahead" key.
    plain = lease(client, project)
    assert plain["id"] == body["id"] and "ahead" not in plain


def test_a_user_never_holds_more_than_two_leases(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.CROWD)
    first = queue.lease_next_task(project, alice, Role.CROWD, fresh=True)
    second = queue.lease_next_task(project, alice, Role.CROWD, fresh=True)
    assert first is not None and second is not None and first.pk != second.pk
    assert queue.lease_next_task(project, alice, Role.CROWD, fresh=True) is None
    assert queue.lease_next_task(project, alice, Role.CROWD).pk == first.pk  # default: the held lease
    client = api_client(alice)
    lease_with_ahead(client, project)
    body = vote(client, project, {"id": first.pk, "patch": {"id": first.patch_id}}).json()
    assert held_by(alice) == {second.pk}
    # An expired lease no longer counts.
    AnnotationTask.objects.filter(pk=second.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    third = queue.lease_next_task(project, alice, Role.CROWD, fresh=True)
    fourth = queue.lease_next_task(project, alice, Role.CROWD, fresh=True)
    assert third is not None and fourth is not None
    assert queue.lease_next_task(project, alice, Role.CROWD, fresh=True) is None
    assert len(held_by(alice)) == 2 and "ahead" not in body


def test_a_vote_with_ahead_returns_a_third_task_different_from_the_held_ones(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.CROWD)
    client = api_client(alice)
    body = lease_with_ahead(client, project)
    current, shown_next = body, body["ahead"]
    response = client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": current["patch"]["id"], "task": current["id"], "label": "benign", "ahead": True},
        format="json",
    )
    assert response.status_code == 201, response.content
    ahead = response.json()["ahead"]
    assert "next" not in response.json()
    assert ahead is not None and ahead["id"] not in {current["id"], shown_next["id"]}
    assert ahead["patch"]["id"] not in {current["patch"]["id"], shown_next["patch"]["id"]}
    assert held_by(alice) == {shown_next["id"], ahead["id"]}
    # Voting on the task shown next brings the last patch; then the queue runs dry for Alice.
    response = client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": shown_next["patch"]["id"], "task": shown_next["id"], "label": "benign", "ahead": True},
        format="json",
    )
    last = response.json()["ahead"]
    assert last is not None and last["id"] not in {current["id"], shown_next["id"], ahead["id"]}
    response = client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": ahead["patch"]["id"], "task": ahead["id"], "label": "benign", "ahead": True, "next": True},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["next"]["id"] == last["id"]  # "next" keeps its meaning: the held lease
    assert response.json()["ahead"] is None


def test_undo_and_skip_work_while_two_leases_are_held(project) -> None:  # type: ignore[no-untyped-def]
    alice = member(project, Role.CROWD)
    client = api_client(alice)
    body = lease_with_ahead(client, project)
    voted, shown = body, body["ahead"]
    ahead = client.post(
        f"/api/v1/projects/{project.pk}/votes/",
        {"patch": voted["patch"]["id"], "task": voted["id"], "label": "benign", "ahead": True},
        format="json",
    ).json()["ahead"]
    assert ahead is not None
    undone = client.post(f"/api/v1/projects/{project.pk}/votes/undo/")
    assert undone.status_code == 200
    again = undone.json()["task"]
    assert again["id"] == voted["id"] and again["state"] == "leased"
    assert held_by(alice) == {voted["id"], shown["id"], ahead["id"]}
    # While three are held (after an undo) nothing fresh is leased...
    assert queue.lease_next_task(project, alice, Role.CROWD, fresh=True) is None
    # ...but each of them can be voted on or skipped.
    assert vote(client, project, again, "squamous").status_code == 201
    assert client.post(f"/api/v1/projects/{project.pk}/tasks/{shown['id']}/skip/").status_code == 200
    assert held_by(alice) == {ahead["id"]}
    assert AnnotationTask.objects.get(pk=shown["id"]).state == "open"
    assert vote(client, project, ahead).status_code == 201
    assert Vote.objects.filter(annotator=alice, is_active=True).count() == 2


def test_an_ahead_lease_never_shares_a_patch_with_a_held_gold_task(project) -> None:  # type: ignore[no-untyped-def]
    project.gold_rate = 1.0
    project.save()
    admin = api_client(member(project, Role.ADMIN))
    gold = Patch.objects.filter(project=project).order_by("id").first()
    admin.post(f"/api/v1/projects/{project.pk}/votes/", {"patch": gold.pk, "label": "squamous"}, format="json")
    assert admin.post(f"/api/v1/projects/{project.pk}/patches/{gold.pk}/gold/").status_code == 200
    student = api_client(member(project, Role.CROWD))
    body = lease_with_ahead(student, project)
    assert AnnotationTask.objects.get(pk=body["id"]).kind == AnnotationTask.Kind.GOLD and body["patch"]["id"] == gold.pk
    assert AnnotationTask.objects.get(pk=body["ahead"]["id"]).kind == AnnotationTask.Kind.CROWD
    assert body["ahead"]["patch"]["id"] != gold.pk


def test_undo_never_takes_a_lease_away_from_someone_else(project) -> None:  # type: ignore[no-untyped-def]
    bob_user = member(project, Role.CROWD)
    alice, bob = api_client(member(project, Role.CROWD)), api_client(bob_user)
    task = lease(alice, project)
    assert vote(alice, project, task).status_code == 201
    bobs = lease(bob, project)
    assert bobs["id"] == task["id"]  # the patch needs a second vote; Bob has it now
    undone = alice.post(f"/api/v1/projects/{project.pk}/votes/undo/")
    assert undone.status_code == 200 and undone.json()["task"] is None
    row = AnnotationTask.objects.get(pk=task["id"])
    assert row.lease_owner_id == bob_user.pk
    assert row.votes_received == 0
    assert vote(bob, project, bobs).status_code == 201
