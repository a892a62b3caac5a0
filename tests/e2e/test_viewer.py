"""The slide viewer in a real browser: tiles, scale bar, overlays, and a patch's votes on click."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.consensus import recompute_consensus
from annotations.models import Role, Vote

from .conftest import login, screenshot

pytestmark = pytest.mark.e2e


def label_patches(committed: Any, project: Any, patches: list[Any], expert: Any) -> None:
    with committed():
        labels = list(project.label_classes.all())
        for i, patch in enumerate(patches):
            label = labels[i % len(labels)]
            Vote.objects.create(project=project, patch=patch, annotator=expert, label=label, role=Role.EXPERT)
            recompute_consensus(project, patch)


def click_patch(page: Any, patch: Any) -> None:
    """Click the centre of a patch, converting level-0 pixels to screen pixels through OpenSeadragon."""
    point = page.evaluate(
        """([x, y]) => {
            const item = window.histoloopViewer.world.getItemAt(0);
            const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
            return {x: p.x, y: p.y};
        }""",
        [patch.x + patch.size / 2, patch.y + patch.size / 2],
    )
    box = page.locator("#osd").bounding_box()
    page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])


def test_the_viewer_loads_tiles_and_shows_labelled_patches_and_their_votes(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    project = seeded.project
    make_member(project, Role.ADMIN, username="e2e-viewer-admin")
    expert = make_member(project, Role.EXPERT, username="e2e-viewer-expert")
    labelled = seeded.patches[:6]
    label_patches(committed, project, labelled, expert)

    login(page, "e2e-viewer-admin", next_path=f"/projects/{project.pk}/viewer/")
    osd = page.locator("#osd")
    expect(osd).to_have_attribute("data-state", "loaded", timeout=20_000)
    assert page.evaluate("window.histoloopMetrics.tilesLoaded") > 0
    expect(osd).to_have_attribute("data-overlay-patches", str(len(seeded.patches)))
    expect(osd).to_have_attribute("data-labelled", str(len(labelled)))
    expect(page.locator("#scale-bar .text")).to_contain_text("µm")

    page.get_by_label("Patch grid").check()
    # No round has run: the heatmap says so instead of drawing nothing.
    page.get_by_label("Model prediction heatmap").check()
    expect(page.locator("#overlay-status")).to_contain_text("No model has been trained yet")
    screenshot(page, "viewer-overlays")

    target = labelled[1]
    click_patch(page, target)
    panel = page.locator("#patch-panel")
    expect(panel).to_be_visible()
    expect(panel.get_by_role("heading", name=f"Patch {target.pk}")).to_be_visible()
    expect(panel).to_contain_text("e2e-viewer-expert (expert)")

    # Admins may label from the viewer (no lease needed); the overlay picks the vote up.
    panel.get_by_role("button", name="squamous").click()
    expect(panel).to_contain_text("e2e-viewer-admin (admin): squamous")
    with committed():
        assert Vote.objects.filter(patch=target, annotator__username="e2e-viewer-admin", is_active=True).exists()
    screenshot(page, "viewer-patch-votes")


def test_a_crowd_member_sees_only_the_patches_they_voted_on(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    project = seeded.project
    student = make_member(project, Role.CROWD, username="e2e-viewer-student")
    expert = make_member(project, Role.EXPERT)
    label_patches(committed, project, seeded.patches[:4], expert)
    with committed():
        benign = project.label_classes.get(name="benign")
        Vote.objects.create(project=project, patch=seeded.patches[0], annotator=student, label=benign, role=Role.CROWD)
        recompute_consensus(project, seeded.patches[0])

    login(page, "e2e-viewer-student", next_path=f"/projects/{project.pk}/viewer/")
    osd = page.locator("#osd")
    expect(osd).to_have_attribute("data-state", "loaded", timeout=20_000)
    expect(osd).to_have_attribute("data-labelled", "1")
    expect(page.get_by_role("link", name="Dashboard")).to_have_count(0)


def test_an_expert_steps_through_patches_and_labels_them_with_the_keyboard(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    project = seeded.project
    expert = make_member(project, Role.EXPERT, username="e2e-viewer-keys")
    reading_order = sorted(seeded.patches, key=lambda p: (p.y, p.x))
    label_patches(committed, project, reading_order[:2], expert)  # the first two already have a label
    with committed():
        squamous = project.label_classes.get(name="squamous")

    login(page, "e2e-viewer-keys", next_path=f"/projects/{project.pk}/viewer/")
    osd = page.locator("#osd")
    expect(osd).to_have_attribute("data-state", "loaded", timeout=20_000)
    expect(osd).to_have_attribute("data-labelled", "2")
    panel = page.locator("#patch-panel")

    page.keyboard.press("Shift+N")  # the first patch without a consensus label
    expect(panel.get_by_role("heading", name=f"Patch {reading_order[2].pk}")).to_be_visible()
    page.keyboard.press("n")
    expect(panel.get_by_role("heading", name=f"Patch {reading_order[3].pk}")).to_be_visible()
    page.keyboard.press("p")
    page.keyboard.press("p")
    expect(panel.get_by_role("heading", name=f"Patch {reading_order[1].pk}")).to_be_visible()
    page.keyboard.press("Shift+N")
    target = reading_order[2]
    expect(panel.get_by_role("heading", name=f"Patch {target.pk}")).to_be_visible()
    expect(panel.get_by_role("button", name="squamous")).to_be_visible()

    page.keyboard.press(squamous.hotkey)
    expect(panel).to_contain_text("e2e-viewer-keys (expert): squamous")
    expect(osd).to_have_attribute("data-labelled", "3")
    with committed():
        vote = Vote.objects.get(patch=target, annotator=expert, is_active=True)
        assert vote.label == squamous
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
