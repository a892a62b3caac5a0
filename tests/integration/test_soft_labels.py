"""Soft labels end to end: a round on the real worker trains on the consensus posteriors the snapshot read
from PostgreSQL, and the project setting is validated through the API."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from annotations import voting
from annotations.models import Consensus, ConsensusMethod, Patch, Project, Role
from learner import round_stages, scores
from learner.models import ModelVersion, TrainingRound
from tests.factories import ProjectFactory, api_client, member
from tests.integration.conftest import wait_for
from tests.integration.lc25000 import CLASS_NAMES, add_lc25000_slides, manifest_rows

NAMES = list(CLASS_NAMES.values())


def split_vote_project(**kwargs: Any) -> tuple[Project, list[int]]:
    """LC25000 patches, 8 of each class labelled by three pathologists who split 2 : 1 (the true class, then
    the next one): every label is the experts' majority, with a posterior of 2/3. Returns the project and
    those patches."""
    project = ProjectFactory(
        classes=[(name, c) for name, c in zip(NAMES, ["#d62728", "#2ca02c", "#1f77b4"], strict=True)],
        batch_size=6,
        random_fraction=0.34,
        consensus_method=ConsensusMethod.MAJORITY,
        **kwargs,
    )
    rows = manifest_rows(10, groups_per_class=8)
    add_lc25000_slides(project, rows)
    experts = [member(project, Role.EXPERT) for _ in range(3)]
    seen: dict[str, int] = {}
    labelled = []
    for row in rows:
        cls = row["_class"]
        if seen.get(cls, 0) >= 8:
            continue
        seen[cls] = seen.get(cls, 0) + 1
        patch = Patch.objects.get(project=project, slide__name=row["path"].split("/")[-1])
        truth = NAMES.index(CLASS_NAMES[cls])
        for expert, label in zip(experts, [truth, truth, (truth + 1) % 3], strict=True):
            voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=NAMES[label])
        labelled.append(patch.pk)
    return project, labelled


def run_on_worker(project: Project, admin: Any) -> TrainingRound:
    response = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 201, response.content
    return wait_for(
        lambda: TrainingRound.objects.filter(pk=response.json()["id"], state__in=["failed", "succeeded"]).first(),
        timeout=240,
        message="the round to end",
    )


def confidence_on(version: ModelVersion, patch_ids: list[int]) -> float:
    """The model's mean probability of each patch's consensus label (from the round's stored scores)."""
    out = []
    for pid in patch_ids:
        patch = Patch.objects.get(pk=pid)
        ids, proba = scores.for_slide(version, patch.slide_id)
        label = NAMES.index(version.label_snapshot[str(pid)])
        out.append(float(proba[list(ids).index(pid), label]))
    return float(np.mean(out))


@pytest.mark.django_db(transaction=True)
def test_a_soft_label_round_on_the_worker_trains_on_the_posterior(celery_worker_process) -> None:  # type: ignore[no-untyped-def]
    project, labelled = split_vote_project(training_labels="soft")
    admin = member(project, Role.ADMIN)
    assert set(Consensus.objects.filter(patch_id__in=labelled).values_list("status", flat=True)) == {"expert"}

    soft_round = run_on_worker(project, admin)
    assert soft_round.state == "succeeded", (soft_round.error, celery_worker_process.log_path.read_text()[-3000:])
    assert soft_round.metrics["training_labels"] == "soft"
    soft = confidence_on(ModelVersion.objects.get(round=soft_round), labelled)

    # The same labels, trained hard: the setting goes through the API like any other.
    response = api_client(admin).patch(f"/api/v1/projects/{project.pk}/", {"training_labels": "hard"}, format="json")
    assert response.status_code == 200 and response.json()["training_labels"] == "hard"
    hard_round = run_on_worker(project, admin)
    assert hard_round.state == "succeeded", hard_round.error
    assert hard_round.metrics["training_labels"] == "hard"
    hard = confidence_on(ModelVersion.objects.get(round=hard_round), labelled)

    # Trained against posteriors of 2/3 the head believes its labels about that much; trained on the same
    # labels as certain it believes them far more.
    assert soft < 0.8, soft
    assert hard > soft + 0.1, (hard, soft)


@pytest.mark.django_db(transaction=True)
def test_the_snapshot_reads_each_labels_posterior_in_class_order() -> None:
    project, labelled = split_vote_project(training_labels="soft")
    pool = round_stages.snapshot(project, NAMES)
    assert pool.posterior is not None and pool.posterior.shape == (len(pool), 3)
    at = np.searchsorted(pool.patch_ids, labelled)
    got = pool.posterior[at]
    for row, pid in zip(got, labelled, strict=True):
        stored = Consensus.objects.get(patch_id=pid).posterior
        np.testing.assert_allclose(row, [stored[n] for n in NAMES], atol=1e-6)
        np.testing.assert_allclose(np.sort(row), [0.0, 1 / 3, 2 / 3], atol=1e-6)
        assert row.argmax() == pool.y[np.searchsorted(pool.patch_ids, pid)]
    # Unlabelled patches have no posterior; a labelled row is used as is, an empty one becomes one-hot.
    assert not pool.posterior[pool.unlabelled].any()
    np.testing.assert_allclose(pool.posteriors(at, 3), got)
    pool.posterior[at[0]] = 0
    assert pool.posteriors(at[:1], 3)[0].tolist() == np.eye(3)[pool.y[at[0]]].tolist()


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["fuzzy", "", None, 3, ["soft"]])
def test_a_bad_training_labels_value_is_refused_and_changes_nothing(value: Any) -> None:
    project = ProjectFactory(training_labels="weighted")
    admin = api_client(member(project, Role.ADMIN))
    response = admin.patch(f"/api/v1/projects/{project.pk}/", {"training_labels": value}, format="json")
    assert response.status_code == 400
    assert "training_labels" in response.json()
    project.refresh_from_db()
    assert project.training_labels == "weighted"


@pytest.mark.django_db
def test_a_new_project_trains_on_hard_labels_unless_told_otherwise() -> None:
    client = api_client(member(ProjectFactory(), Role.ADMIN, is_staff=True))
    plain = client.post("/api/v1/projects/", {"name": "plain labels"}, format="json")
    assert plain.status_code == 201, plain.content
    assert plain.json()["training_labels"] == "hard"
    bad = client.post("/api/v1/projects/", {"name": "bad labels", "training_labels": "probable"}, format="json")
    assert bad.status_code == 400 and "training_labels" in bad.json()
    assert not Project.objects.filter(name="bad labels").exists()
    soft = client.post("/api/v1/projects/", {"name": "soft labels", "training_labels": "soft"}, format="json")
    assert soft.status_code == 201 and Project.objects.get(name="soft labels").training_labels == "soft"
