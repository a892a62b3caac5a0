"""50 annotators leasing and voting at once on one project, on real PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from django.db import connection
from rest_framework.test import APIClient

from annotations.models import AnnotationTask, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member, queue_every_patch

N_ANNOTATORS = 50
N_PATCHES = 40
VOTES_REQUIRED = 3


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_annotators_never_share_a_lease_nor_lose_or_duplicate_a_vote() -> None:
    project = ProjectFactory(votes_required=VOTES_REQUIRED, gold_rate=0.0)
    slides = [SlideFactory(project=project) for _ in range(4)]
    for i in range(N_PATCHES):
        PatchFactory(slide=slides[i % 4])
    queue_every_patch(project)
    users = [member(project, Role.CROWD) for _ in range(N_ANNOTATORS)]

    accepted: list[tuple[int, int, int]] = []  # (vote id, user id, patch id) for every 201
    errors: list[str] = []
    repeated_patch: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_ANNOTATORS)

    def unfinished_without_my_vote(user) -> bool:  # type: ignore[no-untyped-def]
        return (
            AnnotationTask.objects.filter(project=project)
            .exclude(state="done")
            .exclude(patch__votes__annotator=user)
            .exists()
        )

    def annotate(user) -> None:  # type: ignore[no-untyped-def]
        client = APIClient()
        client.force_authenticate(user)
        rng = random.Random(user.pk)
        seen: set[int] = set()
        try:
            barrier.wait()
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                response = client.post(f"/api/v1/projects/{project.pk}/next-task/")
                if response.status_code == 204:
                    # 204 means nothing for this user *now*: the tasks left may all be leased by others,
                    # and come back open needing a vote once those votes land. The annotator page waits
                    # for the queue's websocket event and asks again; this annotator asks again too, and
                    # stops only once no unfinished task is left that they have not voted on.
                    if not unfinished_without_my_vote(user):
                        break
                    connection.close()  # back to the pool while waiting (the test client keeps it otherwise)
                    time.sleep(0.02)
                    continue
                task = response.json()
                patch_id = task["patch"]["id"]
                if patch_id in seen:
                    repeated_patch.append((user.pk, patch_id))
                seen.add(patch_id)
                response = client.post(
                    f"/api/v1/projects/{project.pk}/votes/",
                    {"patch": patch_id, "task": task["id"], "label": rng.choice(["benign", "squamous"])},
                    format="json",
                )
                if response.status_code != 201:
                    errors.append(f"{response.status_code}: {response.content!r}")
                    continue
                with lock:
                    accepted.append((response.json()["vote"]["id"], user.pk, patch_id))
        except Exception as exc:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=annotate, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "annotators did not finish"

    # A double lease would surface as a 409 "lease expired or never yours" on one of the two votes.
    assert errors == []
    assert repeated_patch == []
    stored = set(Vote.objects.filter(project=project).values_list("id", "annotator_id", "patch_id"))
    assert stored == set(accepted), "every 2xx vote is in the table, and nothing else"
    per_person = Counter((user_id, patch_id) for _, user_id, patch_id in accepted)
    assert max(per_person.values()) == 1
    per_patch = Counter(patch_id for _, _, patch_id in accepted)
    assert len(per_patch) == N_PATCHES
    assert set(per_patch.values()) == {VOTES_REQUIRED}
    assert set(AnnotationTask.objects.filter(project=project).values_list("state", flat=True)) == {"done"}


@pytest.mark.django_db(transaction=True)
def test_annotators_asking_ahead_at_once_never_share_a_task_nor_exceed_two_leases() -> None:
    project = ProjectFactory(votes_required=1, gold_rate=0.0)
    slide = SlideFactory(project=project)
    PatchFactory.create_batch(30, slide=slide)
    queue_every_patch(project)
    users = [member(project, Role.CROWD) for _ in range(12)]
    got: list[tuple[int, int]] = []  # (user id, task id) for every lease returned
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(users) * 2)

    def ask(user) -> None:  # type: ignore[no-untyped-def]
        # Two requests per user at once (two tabs): the cap must hold across them too.
        client = APIClient()
        client.force_authenticate(user)
        try:
            barrier.wait()
            response = client.post(f"/api/v1/projects/{project.pk}/next-task/?ahead=1")
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.content!r}")
                return
            body = response.json()
            with lock:
                got.append((user.pk, body["id"]))
                if body["ahead"] is not None:
                    got.append((user.pk, body["ahead"]["id"]))
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=ask, args=(u,)) for u in users for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    owners: dict[int, set[int]] = {}
    for user_id, task_id in got:
        owners.setdefault(task_id, set()).add(user_id)
    assert all(len(who) == 1 for who in owners.values()), "a task was handed to two people"
    leased = Counter(
        AnnotationTask.objects.filter(project=project, state="leased").values_list("lease_owner_id", flat=True)
    )
    assert set(leased) == {u.pk for u in users}
    assert set(leased.values()) == {2}
    for user_id, task_id in got:
        assert AnnotationTask.objects.get(pk=task_id).lease_owner_id == user_id
