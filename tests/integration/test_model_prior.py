"""Adaptive redundancy weighing a patch's votes by the model's posterior for it (``redundancy_model_prior``,
issue 15), on real PostgreSQL: a round keeps the model's posterior on each crowd task it queues; one student's
vote that a sure model agrees with settles the patch (the crowd is asked no more), one the model doubts asks
for more; the round's batch recompute reads the same priors and keeps what the votes settled; the setting is
refused, with the reason, where it would do nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from annotations import consensus, queue, reliability, voting
from annotations.models import AnnotationTask, Consensus, Project, Role
from learner import pipeline, services
from tests.factories import ProjectFactory, api_client, member
from tests.integration.test_rounds import lung_project
from tests.integration.test_value_routing import (
    BENIGN,
    LIKELY_BENIGN,
    SQUAMOUS,
    confused,
    history,
    publish,
    reliable,
    the_task,
)

pytestmark = pytest.mark.django_db


def prior_project(**fields: Any) -> Project:
    settings = {"adaptive_redundancy": True, "redundancy_confidence": 0.9, "redundancy_model_prior": True}
    return ProjectFactory(**{"votes_required": 3, "gold_rate": 0.0, **settings, **fields})


def patch_after_history(project: Project, answer: Callable[[str, int], str]) -> tuple[list[Any], int]:
    """Three students with a voting history answered as ``answer`` says, their crowd fit refreshed, and a patch a
    round queued with a model sure it is benign: (the students, the patch id)."""
    students = [member(project, Role.CROWD) for _ in range(3)]
    history(project, students, answer)
    assert reliability.refresh(project) is not None  # the online fit the per-vote posterior uses
    (pid,) = publish(project, [LIKELY_BENIGN])
    return students, pid


def one_vote(project: Project, student: Any, pid: int, label: str) -> None:
    task = queue.lease_next_task(project, student, Role.CROWD)
    assert task is not None and task.patch_id == pid
    voting.cast_vote(project, student, Role.CROWD, patch_id=pid, label=label, task_id=task.pk)


def test_a_round_keeps_the_models_posterior_on_each_crowd_task() -> None:
    project = lung_project(gold_rate=0.0)
    round_ = services.start_round(project, launch=False)
    result = pipeline.run_round(round_.pk)
    assert result.state == "succeeded", result.error
    batch = list(AnnotationTask.objects.filter(round=result, kind="crowd"))
    assert len(batch) == project.batch_size
    names = set(project.label_classes.values_list("name", flat=True))
    for task in batch:
        assert set(task.model_posterior) == names
        assert sum(task.model_posterior.values()) == pytest.approx(1.0, abs=1e-5)
    # A patch queued before any model (the ingest's spread) carries none.
    assert AnnotationTask.objects.filter(project=project, round__isnull=True, model_posterior__isnull=True).exists()


@pytest.mark.parametrize("with_prior", [True, False])
def test_one_vote_a_sure_model_agrees_with_settles_the_patch(with_prior: bool) -> None:
    project = prior_project(redundancy_model_prior=with_prior)
    students, pid = patch_after_history(project, reliable)
    assert the_task(pid).model_posterior == {"adenocarcinoma": 0.05, "benign": 0.9, "squamous": 0.05}
    one_vote(project, students[0], pid, BENIGN)
    row = Consensus.objects.get(patch_id=pid)
    # The setting keeps the crowd's fit current for the per-vote path (without it, and routing crowd-first,
    # the vote path has the interim weighted result until a round).
    assert (row.method, row.vote_count) == ("dawid_skene" if with_prior else "weighted", 1)
    if with_prior:
        assert (row.status, row.label.name, the_task(pid).state) == ("agreed", BENIGN, "done")
        assert row.confidence == pytest.approx(row.posterior[BENIGN])  # the votes' own posterior
        assert queue.lease_next_task(project, students[1], Role.CROWD) is None
    else:
        assert (row.status, row.label, the_task(pid).state) == ("pending", None, "open")


def test_a_vote_the_model_doubts_asks_for_more() -> None:
    """Students known to guess between the carcinomas say squamous on a patch the model thinks benign: neither
    the vote nor the model is sure, and the crowd is asked again."""
    project = prior_project()
    students, pid = patch_after_history(project, confused)
    one_vote(project, students[0], pid, SQUAMOUS)
    row = Consensus.objects.get(patch_id=pid)
    assert (row.status, the_task(pid).state) == ("pending", "open")
    one_vote(project, students[1], pid, SQUAMOUS)  # the next student gets the same patch


def test_the_batch_recompute_reads_the_priors_and_keeps_what_they_settled() -> None:
    project = prior_project()
    students, pid = patch_after_history(project, reliable)
    one_vote(project, students[0], pid, BENIGN)
    assert the_task(pid).state == "done"
    consensus.recompute_project_consensus(project)  # a round's snapshot
    row = Consensus.objects.get(patch_id=pid)
    assert (row.status, row.label.name, the_task(pid).state) == ("agreed", BENIGN, "done")
    # Without the prior, the batch recompute finds one vote too few: the patch is pending and asked again.
    Project.objects.filter(pk=project.pk).update(redundancy_model_prior=False)
    project.refresh_from_db()
    consensus.recompute_project_consensus(project)
    row.refresh_from_db()
    assert (row.status, row.label, the_task(pid).state) == ("pending", None, "open")


def test_the_setting_is_refused_where_it_would_do_nothing() -> None:
    project = ProjectFactory(consensus_method="majority", adaptive_redundancy=True)
    admin = api_client(member(project, Role.ADMIN))
    url = f"/api/v1/projects/{project.pk}/"
    refused = admin.patch(url, {"redundancy_model_prior": True, "votes_required": 5}, format="json")
    assert refused.status_code == 400
    assert "dawid_skene" in refused.json()["redundancy_model_prior"][0]
    project.refresh_from_db()
    assert (project.redundancy_model_prior, project.votes_required) == (False, 3)
    off = admin.patch(url, {"consensus_method": "dawid_skene", "adaptive_redundancy": False}, format="json")
    assert off.status_code == 200
    refused = admin.patch(url, {"redundancy_model_prior": True}, format="json")
    assert refused.status_code == 400 and "adaptive_redundancy" in refused.json()["redundancy_model_prior"][0]
    ok = admin.patch(url, {"redundancy_model_prior": True, "adaptive_redundancy": True}, format="json")
    assert ok.status_code == 200 and ok.json()["redundancy_model_prior"] is True
    # While it is on, the method cannot move to one whose posterior it could not weigh.
    refused = admin.patch(url, {"consensus_method": "majority"}, format="json")
    assert refused.status_code == 400 and "redundancy_model_prior" in refused.json()
    project.refresh_from_db()
    assert (project.consensus_method, project.redundancy_model_prior) == ("dawid_skene", True)
