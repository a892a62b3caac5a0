"""The annotator in a real browser: keyboard labelling, undo, gold feedback, expert review, live refresh."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.models import AnnotationTask, Role, Vote

from .conftest import PASSWORD, login, screenshot, send_event

pytestmark = pytest.mark.e2e


def shown_patch(page: Any) -> int:
    annotator = page.locator("#annotator")
    expect(annotator).to_have_attribute("data-state", "ready")
    return int(annotator.get_attribute("data-patch"))


def press_and_wait_for_new_patch(page: Any, key: str, previous: int) -> int:
    page.keyboard.press(key)
    expect(page.locator("#annotator")).not_to_have_attribute("data-patch", str(previous))
    return shown_patch(page)


def test_a_crowd_member_labels_five_patches_with_the_keyboard_and_undoes_one(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(gold_rate=0.0)
    student = make_member(seeded.project, Role.CROWD, username="e2e-student")

    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    page.get_by_label("Username").fill("e2e-student")
    page.get_by_label("Password").fill(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Your projects")).to_be_visible()
    row = page.locator(f"tr[data-project='{seeded.project.pk}']")
    expect(row).to_contain_text("crowd")
    expect(row.get_by_role("link", name="Dashboard")).to_have_count(0)
    row.get_by_role("link", name="Annotate").click()

    patch = shown_patch(page)
    labelled = []
    for key in ["1", "2", "3", "1", "2"]:
        labelled.append(patch)
        patch = press_and_wait_for_new_patch(page, key, patch)
    expect(page.locator("#stat-today")).to_have_text("5")
    screenshot(page, "annotator-after-five-votes")

    with committed():
        active = list(Vote.objects.filter(annotator=student, is_active=True).values_list("patch_id", flat=True))
    assert sorted(active) == sorted(labelled)
    assert patch not in labelled

    # U undoes the last vote and shows that patch again, leased back to us.
    page.keyboard.press("u")
    expect(page.locator("#annotator")).to_have_attribute("data-patch", str(labelled[-1]))
    expect(page.locator("#status")).to_contain_text("undone")
    with committed():
        assert Vote.objects.filter(annotator=student, is_active=True).count() == 4
        retracted = Vote.objects.get(annotator=student, patch_id=labelled[-1])
        assert retracted.retracted_at is not None

    # Label it again, then Ctrl+Z undoes that vote too.
    again = press_and_wait_for_new_patch(page, "3", labelled[-1])
    assert again == patch, "after relabelling, the task leased before the undo comes back"
    page.keyboard.press("Control+z")
    expect(page.locator("#annotator")).to_have_attribute("data-patch", str(labelled[-1]))
    with committed():
        assert Vote.objects.filter(annotator=student, is_active=True).count() == 4
    expect(page.locator("#error")).to_be_hidden()
    screenshot(page, "annotator-after-undo")


def test_a_gold_patch_in_training_mode_shows_the_expert_answer(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(gold_rate=1.0, training_mode=True)
    expert = make_member(seeded.project, Role.EXPERT)
    make_member(seeded.project, Role.CROWD, username="e2e-gold-student")
    gold_patch = seeded.patches[0]
    with committed():
        benign = seeded.project.label_classes.get(name="benign")
        Vote.objects.create(project=seeded.project, patch=gold_patch, annotator=expert, label=benign, role=Role.EXPERT)
        from annotations.consensus import recompute_consensus

        recompute_consensus(seeded.project, gold_patch)
        gold_patch.is_gold = True
        gold_patch.save(update_fields=["is_gold"])

    login(page, "e2e-gold-student", next_path=f"/projects/{seeded.project.pk}/annotate/")
    assert shown_patch(page) == gold_patch.pk
    page.keyboard.press("1")  # adenocarcinoma: wrong
    feedback = page.locator("#gold-feedback")
    expect(feedback).to_be_visible()
    expect(feedback).to_contain_text("benign")
    expect(feedback).to_have_attribute("data-correct", "false")
    screenshot(page, "annotator-gold-feedback")


def test_the_expert_queue_shows_the_crowds_votes_on_a_contested_patch(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    project = seeded.project
    make_member(project, Role.EXPERT, username="e2e-pathologist")
    contested = seeded.patches[3]
    with committed():
        labels = list(project.label_classes.all())
        students = [make_member(project, Role.CROWD, username=f"e2e-voter-{i}") for i in range(3)]
        for student, label in zip(students, [labels[0], labels[1], labels[0]], strict=True):
            Vote.objects.create(project=project, patch=contested, annotator=student, label=label, role=Role.CROWD)
        AnnotationTask.objects.create(
            project=project, patch=contested, kind=AnnotationTask.Kind.EXPERT, votes_needed=1, priority=1e6
        )

    login(page, "e2e-pathologist", next_path=f"/projects/{project.pk}/annotate/")
    assert shown_patch(page) == contested.pk
    votes = page.locator("#crowd-votes")
    expect(votes).to_be_visible()
    expect(votes.locator("li")).to_have_count(3)
    expect(votes).to_contain_text("e2e-voter-1")
    expect(votes).to_contain_text(labels[1].name)
    screenshot(page, "annotator-expert-review")


def test_an_idle_annotator_gets_new_work_when_the_queue_refreshes_even_after_a_dropped_socket(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False, gold_rate=0.0)
    make_member(seeded.project, Role.CROWD, username="e2e-idle-student")
    login(page, "e2e-idle-student", next_path=f"/projects/{seeded.project.pk}/annotate/")
    expect(page.locator("#annotator")).to_have_attribute("data-state", "empty")
    expect(page.locator("#empty-queue")).to_be_visible()
    live = page.locator("#live-status")
    expect(live).to_have_attribute("data-state", "open")

    # The connection drops (server restart, network): the page reconnects by itself.
    page.evaluate("window.histoloopLive.drop()")
    expect(live).to_have_attribute("data-state", "reconnecting")
    expect(live).to_have_attribute("data-state", "open", timeout=10_000)

    from tests.factories import queue_every_patch

    with committed():
        queue_every_patch(seeded.project)
    send_event(seeded.project.pk, {"type": "queue.refresh"})
    shown_patch(page)
    screenshot(page, "annotator-after-queue-refresh")
