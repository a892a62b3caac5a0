"""Routing by expected value per cost (issue 15, part 3) and the online reliabilities it reads (part 7), on
real PostgreSQL: a round's patch goes straight to experts where the available students are unreliable on its
likely classes and to the crowd where they are reliable; each task says why (admins see it, the crowd does
not); contested patches still reach experts; the default ``contested`` routing is unchanged; the crowd's
Dawid-Skene fit is refreshed from the votes as they arrive, and routing follows it."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from unittest import mock

import numpy as np
import pytest
from django.utils import timezone

from annotations import consensus, expert_routing, queue, reliability, tasks, voting
from annotations.models import AnnotationTask, Consensus, Patch, Project, ReliabilityFit, Role, Vote
from learner import pipeline, services
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member
from tests.integration.test_rounds import lung_project

pytestmark = pytest.mark.django_db

Kind = AnnotationTask.Kind
ADENO, BENIGN, SQUAMOUS = "adenocarcinoma", "benign", "squamous"  # the factory's label order
# Model posteriors over (adenocarcinoma, benign, squamous).
CARCINOMA_OR_SQUAMOUS = [0.5, 0.0, 0.5]
LIKELY_BENIGN = [0.05, 0.9, 0.05]


def confused(truth: str, n: int) -> str:
    """A student who tells benign tissue apart but guesses between the two carcinomas."""
    return truth if truth == BENIGN else (ADENO, SQUAMOUS)[n % 2]


def reliable(truth: str, n: int) -> str:
    return truth


def history(project: Project, students: list[Any], answer: Callable[[str, int], str], n_patches: int = 30) -> None:
    """Gold patches with an expert's label, each voted on by every student as ``answer`` says."""
    expert = member(project, Role.EXPERT)
    labels = {lc.name: lc for lc in project.label_classes.all()}
    slide = SlideFactory(project=project)
    votes = []
    for n in range(n_patches):
        truth = (ADENO, BENIGN, SQUAMOUS)[n % 3]
        patch = PatchFactory(slide=slide, is_gold=True)
        votes.append(Vote(project=project, patch=patch, annotator=expert, label=labels[truth], role=Role.EXPERT))
        for s, student in enumerate(students):
            label = labels[answer(truth, n + s)]
            votes.append(Vote(project=project, patch=patch, annotator=student, label=label, role=Role.CROWD))
    Vote.objects.bulk_create(votes)


def value_project(**fields: Any) -> Project:
    return ProjectFactory(**{"votes_required": 3, "gold_rate": 0.0, "expert_routing": "value", **fields})


def publish(project: Project, posteriors: list[list[float]]) -> list[int]:
    """Two fresh patches chosen by a round with these model posteriors; returns their ids."""
    slide = SlideFactory(project=project)
    ids = [PatchFactory(slide=slide).pk for _ in posteriors]
    queue.publish_round(
        project,
        round_id=None,  # type: ignore[arg-type]
        chosen=[(pid, "margin") for pid in ids],
        round_number=1,
        proba=np.array(posteriors),
        class_names=[ADENO, BENIGN, SQUAMOUS],
    )
    return ids


def the_task(patch_id: int) -> AnnotationTask:
    (task,) = AnnotationTask.objects.filter(patch_id=patch_id)
    return task


def test_unreliable_students_on_the_likely_classes_send_the_patch_to_experts_and_the_rest_to_the_crowd() -> None:
    project = value_project()
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, confused)
    fit = reliability.refresh(project)
    assert fit is not None and fit.n_votes == 90 and set(fit.students) == {str(s.pk) for s in students}
    hard, easy = publish(project, [CARCINOMA_OR_SQUAMOUS, LIKELY_BENIGN])
    expert_task, crowd_task = the_task(hard), the_task(easy)
    assert (expert_task.kind, expert_task.votes_needed) == (Kind.EXPERT, 1)
    assert expert_task.route_reason.startswith("expert: crowd expected right")
    assert f"on {ADENO} vs {SQUAMOUS}" in expert_task.route_reason
    assert (crowd_task.kind, crowd_task.votes_needed) == (Kind.CROWD, 3)
    assert crowd_task.route_reason.startswith("crowd: crowd expected right")
    # The same round priority band either way: the expert task ranks as the batch does.
    assert 10.0 < crowd_task.priority < expert_task.priority <= 11.0


def test_reliable_students_get_the_whole_batch() -> None:
    project = value_project()
    history(project, [member(project, Role.CROWD) for _ in range(3)], reliable)
    reliability.refresh(project)
    for pid in publish(project, [CARCINOMA_OR_SQUAMOUS, LIKELY_BENIGN]):
        task = the_task(pid)
        assert task.kind == Kind.CROWD
        found = re.match(r"crowd: crowd expected right (\d+)%", task.route_reason)
        assert found is not None and int(found.group(1)) >= 95, task.route_reason


def test_students_below_the_certification_threshold_are_not_the_crowd_routing_weighs() -> None:
    """Their votes would not count in consensus, so routing leaves their reliabilities out: here the only
    reliable students are uncertified, and the confused (certified) one decides the route."""
    from annotations import students as students_module

    project = value_project(certification_threshold=0.9)
    good = [member(project, Role.CROWD) for _ in range(2)]
    poor = member(project, Role.CROWD)
    history(project, good, reliable)
    history(project, [poor], confused)
    reliability.refresh(project)
    students_module.refresh_students(project)
    # Certify the confused student by hand (their counts say so), leave the reliable two below the threshold.
    project.memberships.filter(user=poor).update(gold_answers=50, gold_correct=50)
    project.memberships.filter(user__in=good).update(gold_answers=50, gold_correct=0)
    (pid,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    assert the_task(pid).kind == Kind.EXPERT, the_task(pid).route_reason
    project.certification_threshold = 0.0  # certification off: every student counts, the reliable two dominate
    project.save(update_fields=["certification_threshold"])
    (pid,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    assert the_task(pid).kind == Kind.CROWD, the_task(pid).route_reason


def test_students_who_are_not_available_do_not_count() -> None:
    """Routing weighs the students who can answer: a student removed from the project is left out."""
    project = value_project()
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, reliable)
    reliability.refresh(project)
    project.memberships.filter(role=Role.CROWD).delete()
    (pid,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    task = the_task(pid)
    assert task.kind == Kind.CROWD
    assert task.route_reason == "crowd: the available students have 0 votes in the reliability fit, under 20"


def test_without_a_fit_the_batch_goes_to_the_crowd_and_says_why() -> None:
    project = value_project()
    (pid,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    assert the_task(pid).kind == Kind.CROWD
    assert the_task(pid).route_reason == "crowd: no reliability estimate of the students yet (routing by value)"


def test_contested_default_routes_everything_to_the_crowd_whatever_the_reliabilities() -> None:
    project = value_project(expert_routing="contested")
    history(project, [member(project, Role.CROWD) for _ in range(3)], confused)
    reliability.refresh(project)
    for pid in publish(project, [CARCINOMA_OR_SQUAMOUS, LIKELY_BENIGN]):
        assert (the_task(pid).kind, the_task(pid).route_reason) == (Kind.CROWD, expert_routing.CROWD_FIRST_REASON)


def test_contested_patches_still_go_to_experts_with_value_routing() -> None:
    project = value_project(votes_required=2)
    history(project, [member(project, Role.CROWD) for _ in range(3)], reliable)
    reliability.refresh(project)
    (pid,) = publish(project, [LIKELY_BENIGN])
    assert the_task(pid).kind == Kind.CROWD
    a, b = member(project, Role.CROWD), member(project, Role.CROWD)
    for user, label in ((a, BENIGN), (b, SQUAMOUS)):
        task = queue.lease_next_task(project, user, Role.CROWD)
        assert task is not None and task.patch_id == pid
        voting.cast_vote(project, user, Role.CROWD, patch_id=pid, label=label, task_id=task.pk)
    assert Consensus.objects.get(patch_id=pid).status == "contested"
    review = AnnotationTask.objects.get(patch_id=pid, kind=Kind.EXPERT)
    assert review.route_reason == consensus.CONTESTED_REASON


def test_the_reason_is_shown_to_admins_and_not_to_the_crowd() -> None:
    project = value_project()
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, confused)
    reliability.refresh(project)
    hard, easy = publish(project, [CARCINOMA_OR_SQUAMOUS, LIKELY_BENIGN])
    admin = api_client(member(project, Role.ADMIN))
    listed = admin.get(f"/api/v1/projects/{project.pk}/tasks/", {"kind": "expert"})
    assert listed.status_code == 200, listed.content
    (row,) = listed.json()["results"]
    assert row["patch"] == hard and row["route_reason"] == the_task(hard).route_reason
    page = admin.get(f"/api/v1/projects/{project.pk}/tasks/", {"limit": 1}).json()
    assert len(page["results"]) == 1 and page["next_before"] == page["results"][0]["id"]
    assert admin.get(f"/api/v1/projects/{project.pk}/tasks/", {"kind": "nonsense"}).status_code == 400
    # The admin's own next task carries the reason; a student's does not, nor may a student list the queue.
    admin_task = admin.post(f"/api/v1/projects/{project.pk}/next-task/").json()
    assert admin_task["route_reason"].startswith(("expert:", "crowd:"))
    student = api_client(students[0])
    crowd_task = student.post(f"/api/v1/projects/{project.pk}/next-task/")
    assert crowd_task.status_code == 200 and crowd_task.json()["patch"]["id"] == easy
    assert "route_reason" not in crowd_task.json()
    assert student.get(f"/api/v1/projects/{project.pk}/tasks/").status_code == 403


def test_expert_routing_setting_through_the_api_and_a_bad_value_is_refused() -> None:
    project = ProjectFactory()
    admin = api_client(member(project, Role.ADMIN))
    url = f"/api/v1/projects/{project.pk}/"
    assert admin.get(url).json()["expert_routing"] == "contested"
    bad = admin.patch(url, {"expert_routing": "cheapest", "votes_required": 5}, format="json")
    assert bad.status_code == 400 and "expert_routing" in bad.json()
    project.refresh_from_db()
    assert (project.expert_routing, project.votes_required) == ("contested", 3)
    ok = admin.patch(url, {"expert_routing": "value"}, format="json")
    assert ok.status_code == 200 and ok.json()["expert_routing"] == "value"
    project.refresh_from_db()
    assert project.expert_routing == "value"


def test_votes_schedule_one_refresh_and_the_refresh_updates_what_routing_reads(
    django_capture_on_commit_callbacks: Any,
) -> None:
    project = value_project(votes_required=1)
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, confused)
    reliability.refresh(project)
    (hard,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    assert the_task(hard).kind == Kind.EXPERT
    before = ReliabilityFit.objects.get(project=project)
    # The students have learnt: they now tell the carcinomas apart on new gold patches, voted through the
    # platform's vote path, which schedules one refresh for the burst (not one per vote).
    expert = member(project, Role.EXPERT)
    slide = SlideFactory(project=project)
    reliability.refresh_scheduled(project.pk)
    with mock.patch.object(tasks.refresh_reliabilities_task, "apply_async") as scheduled:
        for n in range(40):
            truth = (ADENO, SQUAMOUS)[n % 2]
            patch = PatchFactory(slide=slide, is_gold=True)
            with django_capture_on_commit_callbacks(execute=True):
                voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=truth)
                for student in students:
                    voting.cast_vote(
                        project, student, Role.CROWD, patch_id=patch.pk, label=truth, crowd_without_task=True
                    )
    assert scheduled.call_count == 1
    assert scheduled.call_args.kwargs == {"countdown": reliability.REFRESH_DELAY_S}
    assert scheduled.call_args.args == ((project.pk,),)
    # The worker runs the scheduled refresh: the stored reliabilities move, and routing follows them.
    assert tasks.refresh_reliabilities_task.run(project.pk) == 90 + 120
    after = ReliabilityFit.objects.get(project=project)
    assert after.fitted_at > before.fitted_at and after.n_votes == 210
    student = str(students[0].pk)
    carcinoma = [0, 2]
    accuracy_before = np.diag(np.asarray(before.students[student]["counts"]))[carcinoma].sum()
    accuracy_after = np.diag(np.asarray(after.students[student]["counts"]))[carcinoma].sum()
    assert accuracy_after > accuracy_before + 30
    (again,) = publish(project, [CARCINOMA_OR_SQUAMOUS])
    assert the_task(again).kind == Kind.CROWD


def test_a_project_routing_crowd_first_schedules_no_refresh(django_capture_on_commit_callbacks: Any) -> None:
    project = ProjectFactory(gold_rate=0.0)
    user = member(project, Role.EXPERT)
    patch = PatchFactory(slide=SlideFactory(project=project))
    with mock.patch.object(tasks.refresh_reliabilities_task, "apply_async") as scheduled:
        with django_capture_on_commit_callbacks(execute=True):
            voting.cast_vote(project, user, Role.EXPERT, patch_id=patch.pk, label=BENIGN)
    assert scheduled.call_count == 0


def test_the_refresh_weights_suggestion_votes_and_leaves_out_those_of_weight_zero() -> None:
    project = value_project(suggestion_weight=0.0)
    students = [member(project, Role.CROWD) for _ in range(2)]
    history(project, students, reliable, n_patches=6)
    Vote.objects.filter(annotator=students[1]).update(provenance=Vote.Provenance.ACCEPTED_SUGGESTION)
    fit = reliability.refresh(project)
    assert fit is not None and set(fit.students) == {str(students[0].pk)} and fit.n_votes == 6


@pytest.mark.django_db(transaction=True)
def test_a_round_routes_its_batch_by_value_from_the_models_posteriors() -> None:
    project = lung_project(gold_rate=0.0)
    project.expert_routing = "value"
    project.save()
    # Students who answer the first class whatever the patch shows: worthless on every class but that one.
    labelled = list(Patch.objects.filter(project=project, consensus__status="expert").order_by("id"))
    first = project.label_classes.order_by("order").first()
    students = [member(project, Role.CROWD) for _ in range(3)]
    Vote.objects.bulk_create(
        Vote(project=project, patch=p, annotator=s, label=first, role=Role.CROWD) for p in labelled for s in students
    )
    assert reliability.refresh(project) is not None
    round_ = services.start_round(project, launch=False)
    result = pipeline.run_round(round_.pk)
    assert result.state == "succeeded", result.error
    batch = AnnotationTask.objects.filter(round=result)
    assert batch.count() == project.batch_size
    assert batch.filter(kind=Kind.EXPERT).exists()
    assert all(t.route_reason.startswith(f"{t.kind}: crowd expected right") for t in batch)


@pytest.mark.parametrize(("answer", "settled"), [(reliable, True), (confused, False)])
def test_adaptive_redundancy_weighs_each_vote_by_the_students_current_reliability(
    answer: Callable[[str, int], str], settled: bool
) -> None:
    """Two students agreeing on squamous settle the patch when they are reliable on it; when they are known to
    guess between the carcinomas, their agreement is not enough and a third vote is asked for."""
    project = value_project(adaptive_redundancy=True, redundancy_confidence=0.9)
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, answer)
    reliability.refresh(project)
    (pid,) = publish(project, [LIKELY_BENIGN])
    for student in students[:2]:
        task = queue.lease_next_task(project, student, Role.CROWD)
        assert task is not None and task.patch_id == pid
        voting.cast_vote(project, student, Role.CROWD, patch_id=pid, label=SQUAMOUS, task_id=task.pk)
    row = Consensus.objects.get(patch_id=pid)
    assert row.method == "dawid_skene" and row.vote_count == 2
    assert (row.status != "pending") is settled
    assert (the_task(pid).state == "done") is settled
    assert (row.posterior[SQUAMOUS] >= 0.9) is settled


def test_a_patch_a_round_sends_to_experts_leaves_the_crowd_queue() -> None:
    """A patch already in the crowd queue that a round routes straight to experts: its open task and its task
    whose lease expired are cancelled in the publish (the students stop voting on it); a lease still running
    is left to its holder, whose vote counts and then closes the task instead of reopening it."""
    project = value_project()
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, confused)
    reliability.refresh(project)
    slide = SlideFactory(project=project)
    still_open, expired, running, stays = (PatchFactory(slide=slide).pk for _ in range(4))
    queue.enqueue_patches(project, {still_open: 0.4, expired: 0.3, running: 0.2, stays: 0.1})
    early, holder, other = students
    now = timezone.now()
    crowd = AnnotationTask.objects.filter(kind=Kind.CROWD)
    crowd.filter(patch_id=expired).update(
        state="leased", lease_owner=early, lease_expires_at=now - timedelta(minutes=1)
    )
    crowd.filter(patch_id=running).update(
        state="leased", lease_owner=holder, lease_expires_at=now + timedelta(minutes=10)
    )

    queue.publish_round(
        project,
        round_id=None,  # type: ignore[arg-type]
        chosen=[(pid, "margin") for pid in (still_open, expired, running)],
        round_number=1,
        proba=np.array([CARCINOMA_OR_SQUAMOUS] * 3),
        class_names=[ADENO, BENIGN, SQUAMOUS],
    )

    def crowd_task(pid: int) -> AnnotationTask:
        (task,) = AnnotationTask.objects.filter(patch_id=pid, kind=Kind.CROWD)
        return task

    for pid in (still_open, expired, running):
        assert AnnotationTask.objects.get(patch_id=pid, kind=Kind.EXPERT).route_reason.startswith("expert:")
    for pid in (still_open, expired):
        task = crowd_task(pid)
        assert (task.state, task.lease_owner_id, task.lease_expires_at) == ("cancelled", None, None)
    kept = crowd_task(running)
    assert (kept.state, kept.lease_owner_id, kept.votes_needed) == ("leased", holder.pk, kept.votes_received + 1)
    assert crowd_task(stays).state == "open"  # not in the batch: untouched
    # The other students are offered only the patch the round did not route to experts.
    task = queue.lease_next_task(project, other, Role.CROWD)
    assert task is not None and task.patch_id == stays
    assert queue.lease_next_task(project, other, Role.CROWD, fresh=True) is None
    # The holder's vote counts, and closes the task: no further student is asked.
    voting.cast_vote(project, holder, Role.CROWD, patch_id=running, label=BENIGN, task_id=kept.pk)
    assert crowd_task(running).state == "done"
    assert Vote.objects.filter(patch_id=running, annotator=holder, is_active=True).exists()
