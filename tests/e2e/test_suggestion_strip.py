"""The accept-the-model strip in a real browser, with the keyboard only: arrows move, F flips one to the
model's second choice, X leaves one out, a digit relabels one, Enter accepts the rest as one action."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from playwright.sync_api import expect

from annotations.models import Consensus, Role, Vote
from learner import scores
from learner.models import ModelVersion, TrainingRound

from .conftest import login, screenshot

pytestmark = pytest.mark.e2e
NAMES = ["adenocarcinoma", "benign", "squamous"]


def scored(seeded: Any, committed: Any) -> ModelVersion:
    """A model version that calls every patch 'benign' (confidence falling with the patch id); its second
    choice is 'squamous'."""
    with committed():
        round_ = TrainingRound.objects.create(project=seeded.project, number=1, state="succeeded")
        version = ModelVersion.objects.create(
            project=seeded.project, round=round_, backbone="b", train_mode="head", weights_path="", class_names=NAMES
        )
        n = len(seeded.patches)
        proba = np.zeros((n, 3), dtype=np.float32)
        proba[:, 1] = np.linspace(0.95, 0.6, n)
        proba[:, 2] = (1 - proba[:, 1]) * 0.7
        proba[:, 0] = 1 - proba[:, 1] - proba[:, 2]
        ids = np.array([p.pk for p in seeded.patches], dtype=np.int64)
        scores.write(version, ids, np.full(n, seeded.slide.pk, dtype=np.int64), proba)
    return version


def test_an_expert_accepts_a_strip_with_the_keyboard_flipping_one_and_leaving_one_out(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    assert len(seeded.patches) >= 8
    version = scored(seeded, committed)
    expert = make_member(seeded.project, Role.EXPERT, username="e2e-strip-expert")
    login(page, "e2e-strip-expert", next_path=f"/projects/{seeded.project.pk}/annotate/")
    page.get_by_role("link", name="Accept the model").click()
    page.select_option("#strip-label", "benign")
    page.fill("#strip-n", "6")
    page.locator("#strip-n").dispatch_event("change")
    strip = page.locator("#strip")
    expect(strip).to_have_attribute("data-state", "ready")
    expect(page.locator(".strip-tile")).to_have_count(6)
    shown = [int(t.get_attribute("data-patch")) for t in page.locator(".strip-tile").all()]
    assert shown == [p.pk for p in seeded.patches[:6]]  # most confident first

    page.keyboard.press("ArrowRight")
    page.keyboard.press("f")  # the second patch: flipped to the model's second choice
    page.keyboard.press("ArrowRight")
    page.keyboard.press("x")  # the third: left out
    page.keyboard.press("ArrowRight")
    page.keyboard.press("1")  # the fourth: relabelled with hotkey 1 (adenocarcinoma)
    page.keyboard.press("ArrowLeft")
    expect(strip).to_have_attribute("data-focus", "2")
    expect(page.locator(f".strip-tile[data-patch='{shown[1]}']")).to_have_attribute("data-decision", "flipped")
    expect(page.locator(f".strip-tile[data-patch='{shown[2]}']")).to_have_attribute("data-decision", "excluded")
    screenshot(page, "strip-before-enter")
    page.keyboard.press("Enter")
    expect(page.locator("#strip-status")).to_contain_text("Recorded 5 votes (3 accepted, 2 changed)")
    # The next strip leaves out what was just labelled (the left-out one comes back).
    expect(page.locator(".strip-tile").first).to_have_attribute("data-patch", str(shown[2]))
    expect(page.locator("#strip-error")).to_be_hidden()

    with committed():
        votes = {v.patch_id: v for v in Vote.objects.filter(annotator=expert).select_related("label")}
        assert set(votes) == {shown[0], shown[1], shown[3], shown[4], shown[5]}
        for pid in (shown[0], shown[4], shown[5]):
            assert votes[pid].label.name == "benign" and votes[pid].provenance == "accepted-suggestion"
            assert votes[pid].model_version_shown_id == version.pk
        assert votes[shown[1]].label.name == "squamous" and votes[shown[1]].provenance == "manual"
        assert votes[shown[3]].label.name == "adenocarcinoma"
        consensus = dict(Consensus.objects.filter(patch_id__in=list(votes)).values_list("patch_id", "label__name"))
        assert consensus == {pid: v.label.name for pid, v in votes.items()}


def test_a_crowd_member_has_no_strip_by_default(page: Any, make_project: Any, make_member: Any, committed: Any) -> None:
    seeded = make_project(queue=True)
    scored(seeded, committed)
    make_member(seeded.project, Role.CROWD, username="e2e-strip-student")
    login(page, "e2e-strip-student", next_path=f"/projects/{seeded.project.pk}/annotate/")
    expect(page.locator("#annotator")).to_have_attribute("data-state", "ready")
    expect(page.get_by_role("link", name="Accept the model")).to_have_count(0)
    page.problems.allow(lambda text, url: "status of 403" in text and url.endswith("/strip/"))
    response = page.goto(f"/projects/{seeded.project.pk}/strip/")
    assert response is not None and response.status == 403
