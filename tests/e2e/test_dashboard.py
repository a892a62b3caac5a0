"""The admin dashboard in a real browser: a training round started from the page, followed live; labelling speed
per mode and the suggestion weight."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.consensus import recompute_consensus
from annotations.models import Role, Vote
from tests.integration.conftest import wait_for

from .conftest import login, screenshot, url_exists

pytestmark = pytest.mark.e2e

# Recorded in the page before the click: every state and percentage the live panel shows.
WATCH_LIVE_PANEL = """() => {
    window.seenRoundStates = [];
    const panel = document.getElementById("round-live");
    new MutationObserver(() => {
        window.seenRoundStates.push([panel.dataset.state, document.getElementById("live-percent").textContent]);
    }).observe(panel, {attributes: true, subtree: true, childList: true, characterData: true});
}"""


def test_an_admin_starts_a_round_and_watches_it_succeed_without_reloading(
    page: Any, make_project: Any, make_member: Any, committed: Any, celery_worker_process: Any
) -> None:
    if not url_exists("/api/v1/projects/1/rounds/"):
        pytest.skip("The training-rounds API (learner.urls) is not mounted yet.")
    seeded = make_project(queue=True, batch_size=20, gold_rate=0.0)
    project = seeded.project
    make_member(project, Role.ADMIN, username="e2e-dashboard-admin")
    expert = make_member(project, Role.EXPERT)
    with committed():
        labels = list(project.label_classes.all())
        for i, patch in enumerate(seeded.patches[:12]):
            Vote.objects.create(project=project, patch=patch, annotator=expert, label=labels[i % 2], role=Role.EXPERT)
            recompute_consensus(project, patch)

    login(page, "e2e-dashboard-admin", next_path=f"/projects/{project.pk}/dashboard/")
    expect(page.locator("#live-status")).to_have_attribute("data-state", "open")
    expect(page.locator("#slides-table tbody tr[data-status='ready']")).to_have_count(1)
    expect(page.locator("#agreement-table")).to_contain_text(expert.username)
    page.evaluate(WATCH_LIVE_PANEL)

    page.get_by_role("button", name="Start round").click()
    live = page.locator("#round-live")
    expect(live).to_be_visible()
    expect(live).not_to_have_attribute("data-state", "starting", timeout=30_000)
    expect(live).to_have_attribute("data-state", "succeeded", timeout=150_000)
    expect(page.locator("#live-percent")).to_have_text("100%")
    row = page.locator("#rounds-table tbody tr").first
    expect(row).to_have_attribute("data-state", "succeeded")
    seen = page.evaluate("window.seenRoundStates")
    assert any(state == "running" for state, _ in seen), f"no running progress was pushed: {seen}"
    assert page.url.endswith(f"/projects/{project.pk}/dashboard/"), "the page must not reload"
    with committed():
        from learner.models import TrainingRound

        round_ = TrainingRound.objects.get(project=project)
        assert round_.state == "succeeded", round_.error
    if round_.metrics.get("confusion_matrix"):
        expect(page.locator("#confusion-table")).to_be_visible()
        expect(page.locator("#learning-curve .uplot")).to_be_visible()
    screenshot(page, "dashboard-round-succeeded")


def test_the_dashboard_shows_labelling_speed_per_mode_and_the_weight_of_suggestions_recomputes_consensus(
    page: Any, make_project: Any, make_member: Any, committed: Any, celery_worker_process: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from annotations import consensus, speed
    from annotations.models import Consensus
    from learner.models import ModelVersion, TrainingRound

    seeded = make_project(queue=False, consensus_method="majority", votes_required=1)
    project, patches = seeded.project, seeded.patches
    make_member(project, Role.ADMIN, username="e2e-speed-admin")
    expert = make_member(project, Role.EXPERT, username="e2e-speed-expert")
    strip = [make_member(project, Role.EXPERT, username=f"e2e-speed-strip{i}") for i in (1, 2)]
    t0 = timezone.now() - timedelta(hours=1)
    second = timedelta(seconds=1)

    def cast(user: Any, patch: Any, label: Any, at: Any, provenance: str, spent_ms: int = 0) -> None:
        vote = Vote.objects.create(
            project=project,
            patch=patch,
            annotator=user,
            label=label,
            role=Role.EXPERT,
            provenance=provenance,
            time_spent_ms=spent_ms,
        )
        Vote.objects.filter(pk=vote.pk).update(created_at=at)

    with committed():
        benign, squamous = (project.label_classes.get(name=n) for n in ("benign", "squamous"))
        # One at a time: 4 labels, the first timed 30 s by the client, then 30 s apart: 120 s, 120 per hour.
        for i in range(4):
            cast(expert, patches[i], benign, t0 + 30 * i * second, "manual", spent_ms=30_000 if i == 0 else 0)
        # A lasso of 6, 30 s after the last single vote: 720 per hour.
        for i in range(6):
            cast(expert, patches[4 + i], squamous, t0 + 120 * second + timedelta(microseconds=i), "bulk")
        # Two experts accept 10 suggestions each, 3 s apart (the first timed 3 s): 20 labels in 60 s, 1,200 per hour.
        for user in strip:
            for i in range(10):
                cast(user, patches[i], squamous, t0 + 3 * i * second, "accepted-suggestion", 3000 if i == 0 else 0)
        consensus.recompute_project_consensus(project)
        assert Consensus.objects.get(patch=patches[0]).label == squamous  # two suggestions outvote one hand
        # The latest model's round, with the modes recorded at its snapshot (manual 4, bulk 6, suggestions 20).
        round_ = TrainingRound.objects.create(
            project=project,
            number=1,
            state="succeeded",
            metrics={"label_provenance": speed.trained_label_modes(project)},
        )
        ModelVersion.objects.create(
            project=project,
            round=round_,
            backbone="test",
            train_mode="head",
            weights_path="",
            class_names=["adenocarcinoma", "benign", "squamous"],
            n_labels=10,
        )

    login(page, "e2e-speed-admin", next_path=f"/projects/{project.pk}/dashboard/")
    modes = page.locator("#speed-modes")
    expect(modes.locator("tr[data-mode='manual'] [data-field='per-hour']")).to_have_text("120")
    expect(modes.locator("tr[data-mode='bulk'] [data-field='per-hour']")).to_have_text("720")
    expect(modes.locator("tr[data-mode='accepted-suggestion'] [data-field='per-hour']")).to_have_text(
        re.compile(r"^1\D?200$")
    )
    expect(modes.locator("tr[data-mode='manual'] [data-field='share']")).to_have_text("13%")
    expect(modes.locator("tr[data-mode='bulk'] [data-field='share']")).to_have_text("20%")
    expect(modes.locator("tr[data-mode='accepted-suggestion'] [data-field='share']")).to_have_text("67%")
    expect(modes.locator("tr[data-mode='accepted-suggestion'] th")).to_have_text("Accepted suggestion")
    expect(page.locator("#speed-model-note")).to_contain_text("round 1")
    person = page.locator("#speed-annotators tr[data-annotator='e2e-speed-strip1'][data-mode='accepted-suggestion']")
    expect(person.locator("[data-field='per-hour']")).to_have_text(re.compile(r"^1\D?200$"))
    expect(page.locator("#provenance-table tr[data-provenance='accepted-suggestion']")).to_contain_text("20")
    screenshot(page, "dashboard-labelling-speed")

    # The admin leaves accepted suggestions out: the worker recomputes, and the hand label wins.
    weight = page.get_by_label("Weight of votes that accepted the model's suggestion")
    expect(weight).to_have_value("1")
    weight.fill("0")
    page.locator("#suggestion-weight-form").get_by_role("button", name="Save").click()
    expect(page.locator("#suggestion-weight-message")).to_contain_text("recomputing")

    def recomputed() -> bool:
        with committed():
            return Consensus.objects.get(patch=patches[0]).label_id == benign.pk

    wait_for(recomputed, timeout=60, message="the worker to recompute consensus without the suggestions")
    with committed():
        project.refresh_from_db()
        assert project.suggestion_weight == 0.0
        assert Consensus.objects.get(patch=patches[0]).vote_count == 1


def test_an_admin_switches_expert_routing_from_the_dashboard(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    project = make_project(queue=False).project
    make_member(project, Role.ADMIN, username="e2e-routing-admin")
    login(page, "e2e-routing-admin", next_path=f"/projects/{project.pk}/dashboard/")
    routing = page.get_by_label("Who gets a round's patches")
    # Enabled once the page has read the project's setting (before, the page's default would be shown and a
    # choice made then overwritten by the loaded value).
    expect(routing).to_be_enabled()
    expect(routing).to_have_value("contested")
    routing.select_option("value")
    page.locator("#expert-routing-form").get_by_role("button", name="Save").click()
    expect(page.locator("#expert-routing-message")).to_contain_text("expected value per cost")
    with committed():
        project.refresh_from_db()
        assert project.expert_routing == "value"


def test_the_dashboard_waits_for_a_large_projects_first_agreement_report_and_says_when_it_was_computed(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    # A large project's first report comes from the worker: the server answers 202 until it is there
    # (tests/integration/test_agreement.py). Here the first answer is that 202, the next ones the server's.
    import json

    seeded = make_project(queue=True, gold_rate=0.0)
    project = seeded.project
    make_member(project, Role.ADMIN, username="e2e-agreement-admin")
    expert = make_member(project, Role.EXPERT)
    with committed():
        labels = list(project.label_classes.all())
        for i, patch in enumerate(seeded.patches[:4]):
            Vote.objects.create(project=project, patch=patch, annotator=expert, label=labels[i % 2], role=Role.EXPERT)
    computing: list[str] = []

    def first_answer_computing(route: Any) -> None:
        if computing:
            route.continue_()
            return
        computing.append(route.request.url)
        body = {"detail": "The agreement report of this project is being computed on the worker.", "refreshing": True}
        route.fulfill(status=202, content_type="application/json", body=json.dumps(body))

    page.route(re.compile(r".*/agreement/$"), first_answer_computing)
    login(page, "e2e-agreement-admin", next_path=f"/projects/{project.pk}/dashboard/")
    table = page.locator("#agreement-table")
    expect(table).to_contain_text("being computed on the worker")
    expect(table).to_contain_text(expert.username, timeout=15_000)  # it looked again by itself
    expect(page.locator("#agreement-figures")).to_contain_text("Computed")
    assert len(computing) == 1
