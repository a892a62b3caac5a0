"""Contested patches reach the experts when they become contested (annotations.consensus): by the vote that
makes them so, or by the bulk recompute that turns them contested; once each, and never by a round's publish,
which writes only its batch."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from annotations import consensus, queue, voting
from annotations.models import AnnotationTask, Consensus, Patch, Role, Vote
from learner import pipeline, services
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member, queue_every_patch
from tests.integration.test_rounds import lung_project

pytestmark = pytest.mark.django_db

Kind = AnnotationTask.Kind


def reviews(project, patch_id: int | None = None) -> list[AnnotationTask]:  # type: ignore[no-untyped-def]
    tasks = AnnotationTask.objects.filter(project=project, kind=Kind.EXPERT)
    if patch_id is not None:
        tasks = tasks.filter(patch_id=patch_id)
    return list(tasks.order_by("id"))


def crowd_vote(project, user, label: str) -> int:  # type: ignore[no-untyped-def]
    """Lease and vote, as a crowd member does; returns the patch voted on."""
    task = queue.lease_next_task(project, user, Role.CROWD)
    assert task is not None
    voting.cast_vote(project, user, Role.CROWD, patch_id=task.patch_id, label=label, task_id=task.pk)
    return task.patch_id


def test_the_vote_that_makes_a_patch_contested_creates_one_review_and_later_votes_none() -> None:
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    patch = PatchFactory(slide=SlideFactory(project=project))
    queue_every_patch(project)
    a, b = member(project, Role.CROWD), member(project, Role.CROWD)
    assert crowd_vote(project, a, "benign") == patch.pk
    assert reviews(project) == []
    crowd_vote(project, b, "squamous")
    assert Consensus.objects.get(patch=patch).status == "contested"
    (review,) = reviews(project)
    assert (review.patch_id, review.state, review.votes_needed) == (patch.pk, "open", 1)
    # A later vote that leaves it contested (a correction), and asking again, queue no second review.
    mine = Vote.objects.get(patch=patch, annotator=a)
    voting.correct_vote(project, a, Role.CROWD, vote_id=mine.pk, label="adenocarcinoma")
    assert Consensus.objects.get(patch=patch).status == "contested"
    assert consensus.send_contested_to_experts(project) == 0
    assert [(t.pk, t.priority) for t in reviews(project)] == [(review.pk, review.priority)]


def test_a_bulk_recompute_routes_the_patches_it_turns_contested_once() -> None:
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    slide = SlideFactory(project=project)
    split, agreed = PatchFactory(slide=slide), PatchFactory(slide=slide)
    a, b = member(project, Role.CROWD), member(project, Role.CROWD)
    benign, squamous = (project.label_classes.get(name=n) for n in ("benign", "squamous"))
    # Votes written without cast_vote (an import, the benchmark's SQL build): nothing routed yet.
    for user, label in ((a, benign), (b, squamous)):
        Vote.objects.create(project=project, patch=split, annotator=user, label=label, role=Role.CROWD)
    for user in (a, b):
        Vote.objects.create(project=project, patch=agreed, annotator=user, label=benign, role=Role.CROWD)
    assert reviews(project) == []
    consensus.recompute_project_consensus(project)
    assert Consensus.objects.get(patch=split).status == "contested"
    assert Consensus.objects.get(patch=agreed).status == "agreed"
    (review,) = reviews(project)
    assert review.patch_id == split.pk
    # Recomputed again: nothing changed, so nothing is written and no second review is queued.
    with CaptureQueriesContext(connection) as queries:
        consensus.recompute_project_consensus(project)
    assert not [q for q in queries.captured_queries if q["sql"].startswith(("UPDATE", "INSERT"))]
    assert [t.pk for t in reviews(project)] == [review.pk]


def test_a_bulk_recompute_routes_a_patch_it_turns_contested_from_agreed() -> None:
    project = ProjectFactory(votes_required=2, gold_rate=0.0)
    patch = PatchFactory(slide=SlideFactory(project=project))
    queue_every_patch(project)
    a, b = member(project, Role.CROWD), member(project, Role.CROWD)
    crowd_vote(project, a, "benign")
    crowd_vote(project, b, "benign")
    assert Consensus.objects.get(patch=patch).status == "agreed" and reviews(project) == []
    # The vote changes behind the per-vote path's back (as a batch method's re-weighting would change a status).
    Vote.objects.filter(patch=patch, annotator=b).update(label=project.label_classes.get(name="squamous"))
    consensus.recompute_project_consensus(project)
    assert Consensus.objects.get(patch=patch).status == "contested"
    assert [t.patch_id for t in reviews(project)] == [patch.pk]


@pytest.mark.django_db(transaction=True)
def test_a_round_creates_no_review_and_leaves_the_routed_ones_as_they_were() -> None:
    project = lung_project(gold_rate=0.0)
    project.votes_required = 2
    project.save()
    unlabelled = Patch.objects.filter(project=project, consensus__isnull=True).order_by("id")[:2]
    a, b = member(project, Role.CROWD), member(project, Role.CROWD)
    benign, squamous = (project.label_classes.get(name=n) for n in ("benign", "squamous"))
    for patch in unlabelled:
        # Two disagreeing votes, and the per-vote consensus update cast_vote runs after each.
        for user, label in ((a, benign), (b, squamous)):
            Vote.objects.create(project=project, patch=patch, annotator=user, label=label, role=Role.CROWD)
            consensus.recompute_consensus(project, patch)
    before = [(t.pk, t.patch_id, t.priority, t.round_id, t.state) for t in reviews(project)]
    assert sorted(p for _, p, *_ in before) == sorted(p.pk for p in unlabelled)
    round_ = services.start_round(project, launch=False)
    result = pipeline.run_round(round_.pk)
    assert result.state == "succeeded", result.error
    assert AnnotationTask.objects.filter(round=result, kind=Kind.CROWD).count() == project.batch_size
    assert not AnnotationTask.objects.filter(round=result, kind=Kind.EXPERT).exists()
    assert [(t.pk, t.patch_id, t.priority, t.round_id, t.state) for t in reviews(project)] == before
