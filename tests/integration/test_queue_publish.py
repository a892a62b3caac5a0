"""Publishing a round's choice into the queue (annotations.queue.publish_round): O(batch) writes, the
batch first, the new model's most uncertain patches next, and leasing never blocked meanwhile."""

from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections, connection, transaction

from annotations import queue
from annotations.models import AnnotationTask, Role
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member, queue_every_patch

Kind = AnnotationTask.Kind


def crowd_order(project) -> list[int]:  # type: ignore[no-untyped-def]
    tasks = AnnotationTask.objects.filter(project=project, kind=Kind.CROWD, state="open")
    return list(tasks.order_by("-priority", "id").values_list("patch_id", flat=True))


def priorities(project) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return dict(AnnotationTask.objects.filter(project=project, kind=Kind.CROWD).values_list("patch_id", "priority"))


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    project = ProjectFactory(votes_required=1, gold_rate=0.0)
    for _ in range(2):
        PatchFactory.create_batch(60, slide=SlideFactory(project=project))
    queue_every_patch(project)
    return project


@pytest.mark.django_db
def test_the_initial_queue_ranks_below_any_round_however_many_patches(project) -> None:  # type: ignore[no-untyped-def]
    spread = priorities(project)
    assert len(spread) == 120 and max(spread.values()) <= 1.0 and min(spread.values()) > 0
    chosen = [(pid, "margin") for pid in crowd_order(project)[-3:]]  # the three the spread put last
    queue.publish_round(project, round_id=None, chosen=chosen, round_number=1)  # type: ignore[arg-type]
    assert crowd_order(project)[:3] == [pid for pid, _ in chosen]


@pytest.mark.django_db
def test_publish_rewrites_the_batch_and_the_uncertain_tail_only(project) -> None:  # type: ignore[no-untyped-def]
    before = priorities(project)
    order = crowd_order(project)
    chosen = [(pid, "margin") for pid in order[100:105]]
    rest = {pid: (i % 50) / 50 for i, pid in enumerate(order)}  # the new model's uncertainty
    rest[order[7]] = 0.999  # the most uncertain of the rest
    queue.publish_round(project, round_id=None, chosen=chosen, rest_priority=rest, round_number=2, tail=4)  # type: ignore[arg-type]
    after = priorities(project)
    changed = {pid for pid in after if after[pid] != before[pid]}
    assert len(changed) == 5 + 4
    new_order = crowd_order(project)
    assert new_order[:5] == [pid for pid, _ in chosen]
    tail = new_order[5:9]
    assert tail[0] == order[7]
    assert [rest[p] for p in tail] == sorted((rest[p] for p in tail), reverse=True)
    assert all(rest[p] >= max(rest[q] for q in order if q not in set(tail) | {c for c, _ in chosen}) for p in tail)
    # Everything else keeps its priority, so the round wrote O(batch) rows.
    assert all(after[p] == before[p] for p in new_order[9:])


@pytest.mark.django_db
def test_a_later_round_outranks_what_an_earlier_round_left(project) -> None:  # type: ignore[no-untyped-def]
    order = crowd_order(project)
    first = [(pid, "margin") for pid in order[10:20]]
    queue.publish_round(project, round_id=None, chosen=first, round_number=1)  # type: ignore[arg-type]
    second = [(pid, "margin") for pid in order[50:52]]
    rest = dict.fromkeys(order, 0.5)
    queue.publish_round(project, round_id=None, chosen=second, rest_priority=rest, round_number=2, tail=3)  # type: ignore[arg-type]
    new_order = crowd_order(project)
    assert new_order[:2] == [pid for pid, _ in second]
    assert set(new_order[5:15]) <= {pid for pid, _ in first} | set(new_order[2:5])


@pytest.mark.django_db(transaction=True)
def test_annotators_get_work_while_a_publish_is_uncommitted(project) -> None:  # type: ignore[no-untyped-def]
    student = member(project, Role.CROWD)
    order = crowd_order(project)
    chosen = [(pid, "margin") for pid in order[:40]]
    rest = dict.fromkeys(order[40:], 0.5)
    published, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with transaction.atomic():
                queue.publish_round(project, round_id=None, chosen=chosen, rest_priority=rest, round_number=1)  # type: ignore[arg-type]
                published.set()
                release.wait(10)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            published.set()
        finally:
            connection.close()

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert published.wait(10)
        close_old_connections()
        task = queue.lease_next_task(project, student, Role.CROWD)
        # The publisher holds locks on 80 of 120 tasks; the lease takes one of the others at once.
        assert task is not None
        assert task.patch_id not in {pid for pid, _ in chosen}
    finally:
        release.set()
        publisher.join(10)
    assert not errors
    assert crowd_order(project)[0] == chosen[0][0] or task.patch_id == chosen[0][0]
