"""The agreement report (annotations.agreement) through the API."""

from __future__ import annotations

import pytest

from annotations.models import Role, Vote
from tests.factories import api_client, member

pytestmark = pytest.mark.django_db


def test_agreement_report_names_the_unreliable_annotator(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    body = api_client(member(project, Role.EXPERT)).get(f"/api/v1/projects/{project.pk}/agreement/").json()
    kappas = {a["username"]: a["cohen_kappa_vs_experts"] for a in body["annotators"]}
    assert kappas["ann"] == pytest.approx(1.0)
    assert kappas["lazy"] is not None and kappas["lazy"] < 0.5
    assert body["krippendorff_alpha"] is not None and body["krippendorff_alpha"] < 1.0
    assert set(body["per_class"]) == {"adenocarcinoma", "benign", "squamous"}


def test_crowd_members_cannot_read_agreement_or_exports(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    crowd = api_client(Vote.objects.filter(project=project, role=Role.CROWD).first().annotator)
    assert crowd.get(f"/api/v1/projects/{project.pk}/agreement/").status_code == 403
    assert crowd.get(f"/api/v1/projects/{project.pk}/export/?format=csv&kind=votes").status_code == 403


def _crowd_votes(body: dict) -> int:  # type: ignore[type-arg]
    return sum(a["n_votes"] for a in body["annotators"] if a["role"] == Role.CROWD)


def test_a_small_projects_report_is_computed_afresh_on_every_request(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, *_ = labelled
    client = api_client(member(project, Role.EXPERT))
    url = f"/api/v1/projects/{project.pk}/agreement/"
    first = client.get(url).json()
    assert first["refreshing"] is False and first["computed_at"] and first["compute_seconds"] < 1.0
    newcomer = member(project, Role.CROWD, username="newcomer")
    Vote.objects.create(
        project=project, patch=patches[0], annotator=newcomer, label=project.label_classes.first(), role=Role.CROWD
    )
    second = client.get(url).json()
    assert _crowd_votes(second) == _crowd_votes(first) + 1
    assert "newcomer" in {a["username"] for a in second["annotators"]}


def test_a_large_projects_first_report_is_asked_of_the_worker_once(labelled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from annotations import agreement, tasks

    project, *_ = labelled
    queued: list[int] = []
    monkeypatch.setattr(agreement, "INLINE_VOTES", 0)
    monkeypatch.setattr(tasks.refresh_agreement_task, "delay", queued.append)
    client = api_client(member(project, Role.EXPERT))
    url = f"/api/v1/projects/{project.pk}/agreement/"
    answers = [client.get(url) for _ in range(3)]
    assert [r.status_code for r in answers] == [202, 202, 202]
    assert answers[0].json()["refreshing"] is True and "worker" in answers[0].json()["detail"]
    assert queued == [project.pk]  # one refresh for three requests
    agreement.refresh_report(project)  # what the worker runs
    body = client.get(url).json()
    assert body["refreshing"] is False and {a["username"] for a in body["annotators"]} >= {"ann", "lazy"}


def test_a_broker_that_cannot_take_the_refresh_gets_a_clear_answer_and_is_asked_again(labelled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from annotations import agreement, tasks

    project, *_ = labelled
    calls: list[int] = []

    def down(project_id: int) -> None:
        calls.append(project_id)
        raise ConnectionError("broker down")

    monkeypatch.setattr(agreement, "INLINE_VOTES", 0)
    monkeypatch.setattr(tasks.refresh_agreement_task, "delay", down)
    client = api_client(member(project, Role.EXPERT))
    url = f"/api/v1/projects/{project.pk}/agreement/"
    for _ in range(2):
        response = client.get(url)
        assert response.status_code == 503 and "queue cannot be reached" in response.json()["detail"]
    assert calls == [project.pk, project.pk]  # the failed attempt left no flag behind
    # With a report already kept, a refresh the broker refuses leaves the last report served, marked by its time.
    kept = agreement.store_report(project)
    monkeypatch.setattr(agreement, "INLINE_SECONDS", -1.0)
    monkeypatch.setattr(agreement, "REPORT_MAX_AGE_S", 0)
    body = client.get(url).json()
    assert body["computed_at"] == kept["computed_at"] and body["refreshing"] is False and len(calls) == 3


@pytest.mark.django_db(transaction=True)
def test_a_slow_report_is_served_from_the_cache_and_refreshed_on_the_worker(celery_worker_process, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from annotations import agreement
    from tests.factories import PatchFactory, ProjectFactory, SlideFactory
    from tests.integration.conftest import wait_for

    project = ProjectFactory(votes_required=3)
    patches = PatchFactory.create_batch(4, slide=SlideFactory(project=project))
    students = [member(project, Role.CROWD, username=f"student-{i}-{project.pk}") for i in range(2)]
    benign = project.label_classes.get(name="benign")
    for patch in patches:
        Vote.objects.create(project=project, patch=patch, annotator=students[0], label=benign, role=Role.CROWD)
    monkeypatch.setattr(agreement, "INLINE_VOTES", 0)  # "large": the first report comes from the worker
    monkeypatch.setattr(agreement, "INLINE_SECONDS", -1.0)  # and every later one too
    client = api_client(member(project, Role.EXPERT))
    url = f"/api/v1/projects/{project.pk}/agreement/"
    assert client.get(url).status_code == 202
    first = wait_for(
        lambda: (r := client.get(url)).status_code == 200 and not r.json()["refreshing"] and r.json(),
        timeout=60,
        message="the worker's first report",
    )
    assert _crowd_votes(first) == 4
    for patch in patches:
        Vote.objects.create(project=project, patch=patch, annotator=students[1], label=benign, role=Role.CROWD)
    # Within REPORT_MAX_AGE_S the last report is served as it was, with when it was computed.
    cached = client.get(url).json()
    assert _crowd_votes(cached) == 4 and cached["computed_at"] == first["computed_at"]
    monkeypatch.setattr(agreement, "REPORT_MAX_AGE_S", 0)
    stale = client.get(url).json()
    assert _crowd_votes(stale) == 4  # served at once while the worker computes the next
    fresh = wait_for(
        lambda: _crowd_votes(body := client.get(url).json()) == 8 and body,
        timeout=60,
        message="the worker's refreshed report",
    )
    assert fresh["computed_at"] > first["computed_at"]
    assert "refresh_agreement" in celery_worker_process.log_path.read_text()
