"""The admin dashboard in a real browser: a training round started from the page, followed live."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.consensus import recompute_consensus
from annotations.models import Role, Vote

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
