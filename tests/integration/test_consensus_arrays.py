"""The bulk recompute on arrays against the record path, on a real project's rows.

``recompute_project_consensus`` reads the votes with one binary COPY (annotations.consensus_batch) and computes
on arrays (annotations.domain.consensus_arrays). Here a seeded project with everything that changes which votes
count and how (experts and an admin, gold patches, retracted votes, students below the certification
threshold, suggestion-made votes at weights 1, 0.5 and 0) is recomputed, and:

- the arrays read are exactly ``vote_records(project, weighted=True)`` (as a multiset);
- every row written is ``batch_consensus`` of those records with ``gold_labels`` (the record path's results):
  label, status, vote count and method exactly, the floats to 1e-9; rows whose votes no longer count pending;
- the rows rewritten after a settings change are exactly those the record path's ``_changed`` rule picks;
- the newly contested patches have an expert review queued.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from annotations import consensus, consensus_batch
from annotations.domain.consensus import batch_consensus
from annotations.models import AnnotationTask, Consensus, Role, Vote
from tests.consensus_reference import record_path_changed
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, member

pytestmark = pytest.mark.django_db

TOLERANCE = 1e-9
ACCEPTED = Vote.Provenance.ACCEPTED_SUGGESTION


def build_world(method: str, seed: int = 7) -> Any:
    """30 patches (12 gold, labelled by two experts who sometimes disagree); 4 students who pass the gold checks,
    3 who do not (too few answers, or too many wrong), votes on the other patches with some ties, an admin's and
    the experts' votes on a few, a quarter of the votes made from a suggestion, some votes retracted."""
    rng = np.random.default_rng(seed)
    project = ProjectFactory(votes_required=3, consensus_method=method, certification_threshold=0.8, gold_rate=0.0)
    labels = list(project.label_classes.order_by("order"))
    slide = SlideFactory(project=project)
    patches = PatchFactory.create_batch(30, slide=slide)
    gold, rest = patches[:12], patches[12:]
    for patch in gold:
        patch.is_gold = True
        patch.save(update_fields=["is_gold"])
    experts = [member(project, Role.EXPERT) for _ in range(2)]
    admin = member(project, Role.ADMIN)
    good = [member(project, Role.CROWD) for _ in range(4)]
    few, wrong, sloppy = (member(project, Role.CROWD) for _ in range(3))
    truth = {p.pk: int(rng.integers(len(labels))) for p in patches}

    def vote(patch: Any, user: Any, role: str, label: int, *, retract_first: bool = False, how: str = "") -> None:
        how = how or (ACCEPTED if rng.random() < 0.25 else Vote.Provenance.MANUAL)
        if retract_first:  # an earlier vote, superseded: inactive
            Vote.objects.create(
                project=project, patch=patch, annotator=user, label=labels[(label + 1) % len(labels)], role=role,
                is_active=False,
            )  # fmt: skip
        Vote.objects.create(
            project=project, patch=patch, annotator=user, label=labels[label], role=role, provenance=how
        )

    for patch in gold:
        vote(patch, experts[0], Role.EXPERT, truth[patch.pk])
        for user in good:
            vote(patch, user, Role.CROWD, truth[patch.pk])
        vote(patch, wrong, Role.CROWD, (truth[patch.pk] + 1) % len(labels))
        vote(patch, sloppy, Role.CROWD, truth[patch.pk] if rng.random() < 0.5 else int(rng.integers(len(labels))))
    for patch in gold[:3]:
        vote(patch, few, Role.CROWD, truth[patch.pk])
    students = [*good, few, wrong, sloppy]
    for patch in rest:
        if patch == rest[-1]:
            continue
        voters = rng.choice(len(students), size=int(rng.integers(1, 6)), replace=False)
        for at in voters:
            noisy = truth[patch.pk] if rng.random() < 0.7 else int(rng.integers(len(labels)))
            vote(patch, students[at], Role.CROWD, noisy, retract_first=rng.random() < 0.15)
        if rng.random() < 0.3:
            vote(patch, experts[0], Role.EXPERT, truth[patch.pk])
            if rng.random() < 0.5:  # a second expert, who may disagree: a tie among experts
                vote(patch, experts[1], Role.EXPERT, int(rng.integers(len(labels))))
        if rng.random() < 0.15:
            vote(patch, admin, Role.ADMIN, truth[patch.pk])
    for user in good[:3]:  # a patch only suggestion-made votes speak for: pending again when they stop counting
        vote(rest[-1], user, Role.CROWD, truth[rest[-1].pk], how=ACCEPTED)
    return project, labels


def as_multiset(project: Any, labels: list[Any]) -> tuple[Counter[tuple[Any, ...]], Counter[tuple[Any, ...]]]:
    arrays = consensus_batch.counted_vote_arrays(project, [lc.pk for lc in labels])
    found = Counter(
        zip(
            arrays.item.tolist(),
            arrays.annotator.tolist(),
            [labels[j].name for j in arrays.label.tolist()],
            arrays.expert.tolist(),
            arrays.weight.tolist(),
            strict=True,
        )
    )
    records = consensus.vote_records(project, weighted=True)
    want = Counter((r.item, r.annotator, r.label, r.is_expert, r.weight) for r in records)
    return found, want


def expected_rows(project: Any) -> dict[int, dict[str, Any]]:
    """The record path's rows: batch_consensus of vote_records with gold_labels, and pending for the patches
    whose votes no longer count."""
    records = consensus.vote_records(project, weighted=True)
    results = batch_consensus(
        records,
        consensus.label_names(project),
        **consensus.consensus_options(project),
        gold=consensus.gold_labels(project, records),
        seed=project.seed,
    )
    by_name = {lc.name: lc for lc in project.label_classes.all()}
    rows = {int(item): consensus.consensus_fields(r, by_name.get(r.label or "")) for item, r in results.items()}
    for pid in Consensus.objects.filter(project=project).values_list("patch_id", flat=True):
        rows.setdefault(pid, consensus._pending_fields(project))
    return rows


def assert_rows_are(project: Any, expected: dict[int, dict[str, Any]], kept: set[int] | None = None) -> None:
    """Every row is the expected one; those in ``kept`` (left alone by the last recompute: they moved by less than
    PROBABILITY_TOLERANCE) only to that tolerance in their probabilities."""
    stored = {c.patch_id: c for c in Consensus.objects.filter(project=project)}
    assert set(stored) == set(expected)
    for pid, want in expected.items():
        row = stored[pid]
        tol = consensus.PROBABILITY_TOLERANCE if kept and pid in kept else TOLERANCE
        context = f"patch {pid}: {want}"
        assert row.label_id == (want["label"].pk if want["label"] is not None else None), context
        assert (row.status, row.vote_count, row.method) == (want["status"], want["vote_count"], want["method"]), context
        assert abs(row.confidence - want["confidence"]) <= tol, context
        assert abs(row.agreement - want["agreement"]) <= tol, context
        assert row.posterior.keys() == want["posterior"].keys(), context
        assert all(abs(row.posterior[k] - v) <= tol for k, v in want["posterior"].items()), context


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_the_vote_arrays_are_the_weighted_vote_records(weight: float) -> None:
    project, labels = build_world("majority")
    project.suggestion_weight = weight
    project.save(update_fields=["suggestion_weight"])
    from annotations.students import refresh_students, uncounted_students

    refresh_students(project, recompute=False)
    assert len(uncounted_students(project)) == 3  # the world has its uncertified students
    found, want = as_multiset(project, labels)
    assert found == want and sum(want.values()) > 50
    if weight == 0.5:
        assert 0.5 in {key[-1] for key in found}


@pytest.mark.parametrize("method", ["majority", "weighted", "expert_override", "dawid_skene"])
def test_the_rows_written_are_the_record_paths(method: str) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    project, _ = build_world(method)
    assert consensus.recompute_project_consensus(project) == len(expected_rows(project))
    assert_rows_are(project, expected_rows(project))
    contested = set(Consensus.objects.filter(project=project, status="contested").values_list("patch_id", flat=True))
    reviews = AnnotationTask.objects.filter(project=project, kind=AnnotationTask.Kind.EXPERT)
    assert contested and contested <= set(reviews.values_list("patch_id", flat=True))

    # Nothing changed: nothing written.
    with CaptureQueriesContext(connection) as queries:
        consensus.recompute_project_consensus(project)
    assert not [q for q in queries.captured_queries if q["sql"].startswith(("UPDATE annotations_consensus", "INSERT"))]

    # Suggestion-made votes count for half, then not at all: the rows rewritten are the ones the record path's
    # rule picks, and every row is the record path's (some patches, only suggested, go back to pending).
    for weight in (0.5, 0.0):
        project.suggestion_weight = weight
        project.save(update_fields=["suggestion_weight"])
        before = {c.patch_id: c for c in Consensus.objects.filter(project=project)}
        want = expected_rows(project)
        should_change = {pid for pid, fields in want.items() if record_path_changed(before[pid], fields)}
        versions = dict(
            Consensus.objects.filter(project=project).extra(select={"v": "xmin::text"}).values_list("patch_id", "v")
        )
        consensus.recompute_project_consensus(project)
        after = dict(
            Consensus.objects.filter(project=project).extra(select={"v": "xmin::text"}).values_list("patch_id", "v")
        )
        assert {pid for pid in after if after[pid] != versions[pid]} == should_change
        assert should_change
        assert_rows_are(project, want, kept=set(want) - should_change)
    assert Consensus.objects.filter(project=project, status="pending", vote_count=0).exists()


def test_the_posterior_is_written_as_json_dumps_writes_it() -> None:
    """The rows are COPY text built without json.dumps: label names that need escaping (quotes, a backslash, a
    tab, which the validators refuse but a database may hold, non-ASCII) read back as json.dumps of the floats."""
    import json

    from django.db import connection

    project = ProjectFactory(votes_required=1, consensus_method="majority")
    project.label_classes.all().delete()
    names = ['say "no"', "back\\slash", "tab\there", "épithélium"]
    labels = [project.label_classes.create(name=n, hotkey=str(i + 1), order=i) for i, n in enumerate(names)]
    patch = PatchFactory(slide=SlideFactory(project=project))
    for label in (labels[0], labels[1], labels[1]):
        Vote.objects.create(project=project, patch=patch, annotator=member(project), label=label, role=Role.CROWD)
    consensus.recompute_project_consensus(project)
    want = {names[0]: 1 / 3, names[1]: 2 / 3, names[2]: 0.0, names[3]: 0.0}
    row = Consensus.objects.get(patch=patch)
    assert row.posterior == want and row.label == labels[1]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT posterior::text = %s::jsonb::text FROM annotations_consensus WHERE id = %s",
            [json.dumps(want), row.pk],
        )
        assert cursor.fetchone() == (True,)
