"""Students who improve (issue 15, part 5; annotations.students): an adaptive gold rate per student, a learning
curve per student (for experts and admins, and for the student in training mode), and a certification threshold
below which a student's votes are recorded but not counted in consensus. Real PostgreSQL, through the REST API."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient
from sklearn.metrics import cohen_kappa_score

from annotations import consensus, queue, students, voting
from annotations.models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db

LABELS = ["adenocarcinoma", "benign", "squamous"]


def make_world(n_gold: int, n_crowd: int, **fields: Any) -> tuple[Project, Any, list[Patch], list[Patch]]:
    """A project with ``n_gold`` gold patches an expert labelled (label i % 3) and ``n_crowd`` queued crowd patches."""
    project = ProjectFactory(**{"votes_required": 1, "consensus_method": "majority", **fields})
    slide = SlideFactory(project=project)
    expert = member(project, Role.EXPERT, username=f"dr-{project.pk}")
    gold = PatchFactory.create_batch(n_gold, slide=slide)
    for i, patch in enumerate(gold):
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=LABELS[i % 3])
    Patch.objects.filter(pk__in=[p.pk for p in gold]).update(is_gold=True)
    crowd = PatchFactory.create_batch(n_crowd, slide=SlideFactory(project=project))
    rows = [(p.pk, p.slide_id) for p in crowd]
    queue.enqueue_patches(project, queue.seeded_spread(rows, project.seed))
    return project, expert, gold, crowd


def truth(gold: list[Patch], patch_id: int) -> str:
    return LABELS[[p.pk for p in gold].index(patch_id) % 3]


def wrong(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % 3]


def answer_gold(project: Project, user: Any, gold: list[Patch], n: int, *, right: bool) -> None:
    """The student answers ``n`` gold patches (first votes, as when they come as gold checks)."""
    answered = set(Vote.objects.filter(annotator=user, patch__in=gold).values_list("patch_id", flat=True))
    for patch in [p for p in gold if p.pk not in answered][:n]:
        label = truth(gold, patch.pk)
        Vote.objects.create(
            project=project,
            patch=patch,
            annotator=user,
            role=Role.CROWD,
            label=LabelClass.objects.get(project=project, name=label if right else wrong(label)),
        )
    students.refresh_students(project, user)


def work(project: Project, user: Any, gold: list[Patch], leases: int, *, right_on_gold: bool) -> int:
    """Lease and vote ``leases`` times through the queue; returns how many of the tasks were gold checks."""
    checks = 0
    for _ in range(leases):
        task = queue.lease_next_task(project, user, Role.CROWD)
        assert task is not None
        label = "benign"
        if task.kind == AnnotationTask.Kind.GOLD:
            checks += 1
            label = truth(gold, task.patch_id) if right_on_gold else wrong(truth(gold, task.patch_id))
        voting.cast_vote(project, user, Role.CROWD, patch_id=task.patch_id, label=label, task_id=task.pk)
    return checks


# --- adaptive gold ---------------------------------------------------------------------------------------------


def test_the_adaptive_rule_tapers_from_the_ceiling_to_the_floor() -> None:
    project = Project(gold_rate=0.1, adaptive_gold=True, certification_threshold=0.0)
    unknown = students.adaptive_gold_rate(project, 0, 0)
    weak = students.adaptive_gold_rate(project, 20, 8)
    proven = students.adaptive_gold_rate(project, 30, 30)
    assert weak > unknown > 0.1 > proven
    assert weak <= 0.3 + 1e-9 and proven >= 0.1 / 3 - 1e-9
    assert unknown == pytest.approx(0.1 / 3 + (0.3 - 0.1 / 3) * students.PROVEN_ACCURACY)
    project.adaptive_gold = False
    assert students.adaptive_gold_rate(project, 0, 0) == students.adaptive_gold_rate(project, 30, 30) == 0.1
    capped = Project(gold_rate=0.4, adaptive_gold=True, certification_threshold=0.0)
    assert students.adaptive_gold_rate(capped, 0, 0) <= students.MAX_ADAPTIVE_GOLD_RATE


def test_an_unknown_student_gets_more_gold_checks_than_a_proven_one() -> None:
    project, _, gold, _ = make_world(60, 120, gold_rate=0.1, adaptive_gold=True, seed=7)
    proven, unknown = member(project, Role.CROWD, username="proven"), member(project, Role.CROWD, username="new")
    answer_gold(project, proven, gold, 20, right=True)
    assert Membership.objects.get(project=project, user=proven).gold_correct == 20
    # The coin over many vote counts (what the next leases would draw): reproducible, one query each.
    flips = {
        name: sum(queue._wants_gold(project, user, ahead=k) for k in range(600))
        for name, user in (("proven", proven), ("unknown", unknown))
    }
    assert flips["unknown"] > 3 * flips["proven"], flips
    with CaptureQueriesContext(connection) as sent:
        queue._wants_gold(project, unknown, ahead=0)
    assert len(sent) == 1, [q["sql"][:80] for q in sent]  # the vote count and the gold counts, one statement
    assert flips == {
        name: sum(queue._wants_gold(project, user, ahead=k) for k in range(600))
        for name, user in (("proven", proven), ("unknown", unknown))
    }
    # Through the queue: a student who keeps failing gold checks keeps getting many, a proven one few.
    checks_weak = work(project, unknown, gold, 60, right_on_gold=False)
    checks_proven = work(project, proven, gold, 60, right_on_gold=True)
    assert checks_weak > 2 * checks_proven, (checks_weak, checks_proven)
    weak = Membership.objects.get(project=project, user=unknown)
    assert weak.gold_answers == checks_weak and weak.gold_correct == 0  # counted at each gold answer


def test_with_adaptive_gold_off_every_student_has_the_fixed_rate() -> None:
    project, _, gold, _ = make_world(30, 10, gold_rate=0.1, adaptive_gold=False, seed=7)
    proven, unknown = member(project, Role.CROWD, username="proven"), member(project, Role.CROWD, username="new")
    answer_gold(project, proven, gold, 20, right=True)
    for user in (proven, unknown):
        n_votes = Vote.objects.filter(project=project, annotator=user).count()
        expected = [random.Random(f"7:{user.pk}:{n_votes + k}").random() < 0.1 for k in range(300)]
        assert [queue._wants_gold(project, user, ahead=k) for k in range(300)] == expected


# --- learning curve --------------------------------------------------------------------------------------------


def crafted_history() -> tuple[Project, Any, Any, list[tuple[str, str | None, bool]]]:
    """A student's 12 answers in a known order: (their label, the experts' label or None, is gold)."""
    project = ProjectFactory(votes_required=1, consensus_method="majority", training_mode=False)
    slide = SlideFactory(project=project)
    expert = member(project, Role.EXPERT, username="dr_curve")
    student = member(project, Role.CROWD, username="curve_student")
    history: list[tuple[str, str | None, bool]] = [
        ("benign", "benign", True),
        ("benign", "squamous", True),
        ("squamous", "squamous", False),
        ("adenocarcinoma", None, False),
        ("benign", "adenocarcinoma", False),
        ("squamous", "squamous", True),
        ("adenocarcinoma", "adenocarcinoma", True),
        ("benign", "benign", False),
        ("squamous", "benign", False),
        ("benign", None, False),
        ("adenocarcinoma", "adenocarcinoma", True),
        ("squamous", "squamous", False),
    ]
    labels = {lc.name: lc for lc in project.label_classes.all()}
    start = timezone.now() - timedelta(days=3)
    for i, (answer, reference, is_gold) in enumerate(history):
        patch = PatchFactory(slide=slide, is_gold=is_gold)
        if reference is not None:
            voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=reference)
        vote = Vote.objects.create(
            project=project, patch=patch, annotator=student, role=Role.CROWD, label=labels[answer]
        )
        Vote.objects.filter(pk=vote.pk).update(created_at=start + timedelta(hours=i))
        if i == 1:
            # Shown the answer (training mode), the student corrects it: the curve keeps their first answer.
            voting.correct_vote(project, student, Role.CROWD, vote_id=vote.pk, label=reference)
    return project, expert, student, history


def expected_block(rows: list[tuple[str, str | None, bool]]) -> dict[str, Any]:
    pairs = [(a, r) for a, r, _ in rows if r is not None]
    gold = [(a, r) for a, r, g in rows if g and r is not None]
    return {
        "n_answers": len(rows),
        "gold_answers": len(gold),
        "gold_correct": sum(a == r for a, r in gold),
        "n_expert_pairs": len(pairs),
        "kappa": cohen_kappa_score([a for a, _ in pairs], [r for _, r in pairs], labels=LABELS),
    }


def test_the_learning_curve_has_the_blocks_of_a_crafted_history() -> None:
    project, expert, student, history = crafted_history()
    body = api_client(expert).get(f"/api/v1/projects/{project.pk}/students/{student.pk}/learning-curve/?block=5")
    assert body.status_code == 200, body.content
    blocks = body.json()["blocks"]
    assert [(b["first_answer"], b["last_answer"]) for b in blocks] == [(1, 5), (6, 10), (11, 12)]
    for block, rows in zip(blocks, (history[0:5], history[5:10], history[10:12]), strict=True):
        want = expected_block(rows)
        assert block["n_answers"] == want["n_answers"]
        assert (block["gold_answers"], block["gold_correct"]) == (want["gold_answers"], want["gold_correct"])
        assert block["gold_accuracy"] == pytest.approx(want["gold_correct"] / want["gold_answers"])
        assert block["n_expert_pairs"] == want["n_expert_pairs"]
        assert block["kappa_vs_experts"] == pytest.approx(want["kappa"])
    assert blocks[0]["gold_accuracy"] == 0.5  # the corrected answer counts as first given: wrong
    assert blocks[0]["from"] < blocks[0]["to"] <= blocks[1]["from"]
    assert body.json()["student"]["username"] == "curve_student"
    whole = api_client(expert).get(f"/api/v1/projects/{project.pk}/students/{student.pk}/learning-curve/?block=25")
    assert [b["n_answers"] for b in whole.json()["blocks"]] == [12]


def test_the_learning_curve_is_cached_until_what_it_is_computed_from_changes(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Served from the cache (shared by every server process) until the student votes, an expert's label on their
    patches changes (a vote, an undo, a bulk label) or the gold set does: each of those is seen at once."""
    from annotations import bulk_voting

    project, expert, student, history = crafted_history()
    admin = member(project, Role.ADMIN)
    answered = list(
        Vote.objects.filter(annotator=student).order_by("created_at", "id").values_list("patch_id", flat=True)
    )
    unjudged = answered[next(i for i, (_, ref, _) in enumerate(history) if ref is None)]  # no expert label yet

    def curve() -> tuple[dict[str, Any], int]:
        """The served curve and how many times the curve's own query ran for it."""
        with CaptureQueriesContext(connection) as queries:
            body = students.learning_curve(project, student.pk, 5)
        computed = sum("WITH answers AS" in q["sql"] for q in queries.captured_queries)
        assert body == students.compute_learning_curve(project, student.pk, 5)  # never stale
        return body, computed

    def committed(write: Any) -> Any:
        """A write as a request makes it: its on-commit callbacks (the curves' stamp) run."""
        with django_capture_on_commit_callbacks(execute=True):
            return write()

    def blocks(body: dict[str, Any]) -> list[tuple[int, int, int]]:
        return [(b["n_answers"], b["n_expert_pairs"], b["gold_answers"]) for b in body["blocks"]]

    first, computed = curve()
    assert computed == 1
    assert curve() == (first, 0)  # the cache answers
    # Another student's vote changes nothing this curve reads: still cached.
    classmate = member(project, Role.CROWD)
    committed(
        lambda: voting.cast_vote(
            project, classmate, Role.CROWD, patch_id=unjudged, label="benign", crowd_without_task=True
        )
    )
    assert curve() == (first, 0)
    # An expert labels a patch the student answered: one more expert pair in the block it is in.
    committed(lambda: voting.cast_vote(project, expert, Role.EXPERT, patch_id=unjudged, label="squamous"))
    judged, computed = curve()
    assert computed == 1 and sum(b[1] for b in blocks(judged)) == sum(b[1] for b in blocks(first)) + 1
    committed(lambda: voting.undo_last_vote(project, expert))
    assert curve() == (first, 1)
    # Marked gold by an admin (it needs its expert label first, given in bulk): one more gold answer.
    committed(
        lambda: bulk_voting.cast_bulk_votes(project, admin, Role.ADMIN, patch_ids=[unjudged], label="adenocarcinoma")
    )
    labelled, computed = curve()
    assert computed == 1 and sum(b[2] for b in blocks(labelled)) == sum(b[2] for b in blocks(first))
    url = f"/api/v1/projects/{project.pk}/patches/{unjudged}/gold/"
    marked = committed(lambda: api_client(admin).post(url, {"gold": True}))
    assert marked.status_code == 200, marked.content
    gold, computed = curve()
    assert computed == 1 and sum(b[2] for b in blocks(gold)) == sum(b[2] for b in blocks(first)) + 1
    # The student's own next answer: a thirteenth answer in the last block.
    new = PatchFactory(slide=SlideFactory(project=project)).pk
    committed(
        lambda: voting.cast_vote(project, student, Role.CROWD, patch_id=new, label="benign", crowd_without_task=True)
    )
    mine, computed = curve()
    assert computed == 1 and [b[0] for b in blocks(mine)] == [5, 5, 3]
    assert curve() == (mine, 0)


def test_a_student_sees_only_their_own_curve_and_only_in_training_mode() -> None:
    project, _, student, _ = crafted_history()
    other = member(project, Role.CROWD, username="classmate")
    client = api_client(other)
    assert client.get(f"/api/v1/projects/{project.pk}/students/{student.pk}/learning-curve/").status_code == 403
    assert client.get(f"/api/v1/projects/{project.pk}/students/").status_code == 403
    # Outside training mode the blocks' gold counts would tell a student which tasks were gold checks.
    refused = client.get(f"/api/v1/projects/{project.pk}/my-progress/")
    assert refused.status_code == 403 and "training mode" in refused.json()["detail"]
    Project.objects.filter(pk=project.pk).update(training_mode=True)
    mine = api_client(student).get(f"/api/v1/projects/{project.pk}/my-progress/?block=5").json()
    assert mine["user"] == student.pk and [b["n_answers"] for b in mine["blocks"]] == [5, 5, 2]
    assert mine["me"]["gold_answers"] == Membership.objects.get(project=project, user=student).gold_answers
    theirs = client.get(f"/api/v1/projects/{project.pk}/my-progress/").json()
    assert theirs["user"] == other.pk and theirs["blocks"] == []  # never the classmate's data
    outsider = api_client(member(ProjectFactory(), Role.ADMIN))
    assert outsider.get(f"/api/v1/projects/{project.pk}/students/{student.pk}/learning-curve/").status_code == 404


@pytest.mark.parametrize("block", ["0", "4", "1001", "ten", "-5", "2.5"])
def test_a_bad_block_size_is_a_400(block: str) -> None:
    project, expert, student, _ = crafted_history()
    client = api_client(expert)
    response = client.get(f"/api/v1/projects/{project.pk}/students/{student.pk}/learning-curve/?block={block}")
    assert response.status_code == 400 and "block" in response.json()["detail"]


def test_a_non_member_has_no_curve() -> None:
    project, expert, _, _ = crafted_history()
    stranger = member(ProjectFactory(), Role.CROWD)
    url = f"/api/v1/projects/{project.pk}/students/{stranger.pk}/learning-curve/"
    assert api_client(expert).get(url).status_code == 404


# --- certification ---------------------------------------------------------------------------------------------


def row(patch: Patch) -> Consensus:
    return Consensus.objects.get(patch=patch)


def test_an_uncertified_students_vote_counts_only_once_they_are_certified() -> None:
    project, _, gold, crowd = make_world(12, 4, gold_rate=0.0, certification_threshold=0.8)
    student, certified = member(project, Role.CROWD, username="learner"), member(project, Role.CROWD, username="pro")
    answer_gold(project, certified, gold, 10, right=True)
    task = queue.lease_next_task(project, student, Role.CROWD)
    assert task is not None
    voting.cast_vote(project, student, Role.CROWD, patch_id=task.patch_id, label="squamous", task_id=task.pk)
    target = Patch.objects.get(pk=task.patch_id)
    recorded = row(target)
    assert Vote.objects.filter(patch=target, annotator=student, is_active=True).exists()  # recorded
    assert (recorded.label_id, recorded.vote_count, recorded.status) == (None, 0, "pending")  # not counted
    # A certified student's vote on another patch counts at once.
    other = next(p for p in crowd if p.pk != target.pk)
    voting.cast_vote(project, certified, Role.CROWD, patch_id=other.pk, label="benign", crowd_without_task=True)
    assert (row(other).label.name, row(other).status) == ("benign", "agreed")

    # The batch recompute (Dawid-Skene) leaves the student out as well.
    Project.objects.filter(pk=project.pk).update(consensus_method="dawid_skene")
    project.refresh_from_db()
    consensus.recompute_project_consensus(project)
    assert (row(target).vote_count, row(target).status) == (0, "pending")
    assert Membership.objects.get(project=project, user=student).certified_at is None

    # Nine right gold answers are not enough (the minimum is 10); the tenth, a gold check through the queue,
    # certifies them, and their earlier vote counts from then on.
    answer_gold(project, student, gold, 9, right=True)
    assert (row(target).vote_count, row(target).status) == (0, "pending")
    Project.objects.filter(pk=project.pk).update(gold_rate=1.0)
    project.refresh_from_db()
    check = queue.lease_next_task(project, student, Role.CROWD)
    assert check is not None and check.kind == AnnotationTask.Kind.GOLD
    voting.cast_vote(
        project, student, Role.CROWD, patch_id=check.patch_id, label=truth(gold, check.patch_id), task_id=check.pk
    )
    membership = Membership.objects.get(project=project, user=student)
    assert (membership.gold_answers, membership.gold_correct) == (10, 10) and membership.certified_at is not None
    counted = row(target)
    assert (counted.label.name, counted.vote_count, counted.status) == ("squamous", 1, "agreed")
    consensus.recompute_project_consensus(project)
    assert (row(target).label.name, row(target).vote_count) == ("squamous", 1)

    # The admins' table says who is certified.
    table = api_client(member(project, Role.ADMIN)).get(f"/api/v1/projects/{project.pk}/students/").json()
    by_name = {s["username"]: s for s in table["students"]}
    assert by_name["learner"]["certified"] is True and by_name["learner"]["gold_accuracy"] == 1.0
    assert table["min_gold_answers"] == students.MIN_GOLD_FOR_CERTIFICATION


def test_a_student_who_falls_below_the_threshold_stops_counting() -> None:
    project, _, gold, crowd = make_world(30, 2, gold_rate=0.0, certification_threshold=0.8)
    student = member(project, Role.CROWD)
    answer_gold(project, student, gold, 10, right=True)
    voting.cast_vote(project, student, Role.CROWD, patch_id=crowd[0].pk, label="benign", crowd_without_task=True)
    assert row(crowd[0]).vote_count == 1
    # Ten wrong answers more: 10 of 20 right, below 0.8. Their patches are recomputed without them.
    answered = set(Vote.objects.filter(annotator=student).values_list("patch_id", flat=True))
    for patch in [p for p in gold if p.pk not in answered][:10]:
        Vote.objects.create(
            project=project,
            patch=patch,
            annotator=student,
            role=Role.CROWD,
            label=LabelClass.objects.get(project=project, name=wrong(truth(gold, patch.pk))),
        )
    changed = students.refresh_students(project, student)
    assert changed == [student.pk]
    assert (row(crowd[0]).vote_count, row(crowd[0]).status) == (0, "pending")


# --- settings --------------------------------------------------------------------------------------------------


def patch_settings(client: APIClient, project: Project, body: dict[str, Any]) -> Any:
    return client.patch(f"/api/v1/projects/{project.pk}/", body, format="json")


@pytest.mark.parametrize(
    "body",
    [
        {"certification_threshold": 1.5},
        {"certification_threshold": -0.1},
        {"certification_threshold": "NaN"},
        {"certification_threshold": "most"},
        {"certification_threshold": None},
        {"adaptive_gold": "maybe"},
        {"adaptive_gold": True, "certification_threshold": 2},
    ],
)
def test_bad_student_settings_are_refused_and_change_nothing(
    body: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:  # type: ignore[no-untyped-def]
    project = ProjectFactory(certification_threshold=0.7, adaptive_gold=False)
    admin = api_client(member(project, Role.ADMIN))
    with django_capture_on_commit_callbacks() as callbacks:
        response = patch_settings(admin, project, body)
    assert response.status_code == 400
    assert set(response.json()) & set(body)
    assert not callbacks
    project.refresh_from_db()
    assert (project.certification_threshold, project.adaptive_gold) == (0.7, False)


def test_student_settings_are_admin_only_and_a_new_threshold_recomputes(
    django_capture_on_commit_callbacks: Any,
) -> None:  # type: ignore[no-untyped-def]
    project, expert, _, crowd = make_world(12, 2, gold_rate=0.0, certification_threshold=0.0)
    student = member(project, Role.CROWD)
    voting.cast_vote(project, student, Role.CROWD, patch_id=crowd[0].pk, label="benign", crowd_without_task=True)
    assert patch_settings(api_client(expert), project, {"certification_threshold": 0.9}).status_code == 403
    admin = api_client(member(project, Role.ADMIN))
    with django_capture_on_commit_callbacks() as callbacks:
        response = patch_settings(admin, project, {"certification_threshold": 0.9, "adaptive_gold": True})
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["certification_threshold"], body["adaptive_gold"]) == (0.9, True)
    assert body["consensus_recompute"] == "queued"
    assert len(callbacks) == 1  # the whole project, on the worker
    # The per-vote path applies the new threshold at once: the student's next vote is left out.
    project.refresh_from_db()
    voting.cast_vote(project, student, Role.CROWD, patch_id=crowd[1].pk, label="benign", crowd_without_task=True)
    assert row(crowd[1]).vote_count == 0
    with django_capture_on_commit_callbacks() as callbacks:
        unchanged = patch_settings(admin, project, {"certification_threshold": 0.9})
    assert unchanged.status_code == 200 and "consensus_recompute" not in unchanged.json() and not callbacks
