"""Starting a round when another request took its number first (found by the API fuzzer): never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from annotations.models import Role
from learner import services
from learner.models import TrainingRound
from tests.factories import ProjectFactory, api_client, member


def ended_round(project: Any, number: int) -> TrainingRound:
    return TrainingRound.objects.create(project=project, number=number, state="failed", stage="queued")


@pytest.mark.django_db
def test_a_number_taken_by_a_round_that_already_ended_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    project = ProjectFactory()
    ended_round(project, 1)
    real = services._next_number
    calls: list[int] = []

    def stale_then_real(p: Any) -> int:
        calls.append(1)
        return 1 if len(calls) == 1 else real(p)  # the first read predates the other request's round

    monkeypatch.setattr(services, "_next_number", stale_then_real)
    round_ = services.start_round(project, launch=False)
    assert round_.number == 2 and round_.state == "queued" and len(calls) == 2


@pytest.mark.django_db
def test_a_number_taken_again_and_again_is_a_409_with_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    project = ProjectFactory()
    ended_round(project, 1)
    monkeypatch.setattr(services, "_next_number", lambda p: 1)
    admin = member(project, Role.ADMIN)
    response = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 409
    assert "try again" in response.json()["detail"]
    assert TrainingRound.objects.filter(project=project).count() == 1  # nothing was created


@pytest.mark.django_db
def test_a_round_still_active_is_a_conflict_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    project = ProjectFactory()
    active = TrainingRound.objects.create(project=project, number=1, state="running", stage="train")
    monkeypatch.setattr(services, "_next_number", lambda p: 1)
    with pytest.raises(services.RoundConflict) as caught:
        services.start_round(project, launch=False)
    assert caught.value.active == active
