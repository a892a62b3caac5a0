"""The embedding map in a real browser: an expert lassoes a cluster (a Shift + drag of the mouse on the WebGL
canvas), leaves one patch out in the gallery, labels the rest in one action, and undoes it."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import expect

from annotations.models import Consensus, Role, Vote, VoteBatch

from .conftest import login, screenshot

pytestmark = pytest.mark.e2e

# Screen positions (page coordinates) of the points with these indices.
SCREEN_POSITIONS = """(indices) => {
    const box = document.getElementById("map-canvas").getBoundingClientRect();
    return indices.map((i) => {
        const [x, y] = window.histoloopMap.plot.getScreenPosition(i);
        return [box.left + x, box.top + y];
    });
}"""


def cluster_box(page: Any, count: int) -> tuple[float, float, float, float]:
    """The screen box (x0, y0, x1, y1, page coordinates) around the points 0..count-1, with a 12 px margin."""
    positions = np.array(page.evaluate(SCREEN_POSITIONS, list(range(count))))
    (x0, y0), (x1, y1) = positions.min(axis=0) - 12, positions.max(axis=0) + 12
    return float(x0), float(y0), float(x1), float(y1)


def lasso_box(page: Any, box: tuple[float, float, float, float]) -> None:
    """A Shift + drag of the mouse around the box, ending one pixel short of where it began."""
    x0, y0, x1, y1 = box
    page.keyboard.down("Shift")
    page.mouse.move(x0, y0)
    page.mouse.down()
    for x, y in ((x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)):
        page.mouse.move(x, y, steps=12)
    page.mouse.up()
    page.keyboard.up("Shift")


def two_clusters(seeded: Any, committed: Any) -> tuple[list[int], list[int]]:
    """A stored map of the project's patches: the first half around (-0.5, -0.5), the rest around (0.5, 0.5)."""
    from learner import layout, maps

    ids = np.array([p.pk for p in seeded.patches], dtype=np.int64)
    half = len(ids) // 2
    rng = np.random.default_rng(0)
    xy = rng.uniform(-0.15, 0.15, (len(ids), 2)).astype(np.float32)
    xy[:half] += -0.5
    xy[half:] += 0.5
    built = layout.Layout(ids, np.full(len(ids), seeded.slide.pk), xy, "pca", layout.pool_digest(ids))
    with committed():
        maps.save(seeded.project, built, 0.0)
    return ids[:half].tolist(), ids[half:].tolist()


def test_an_expert_lassoes_a_cluster_labels_all_but_one_and_undoes_it(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    project = seeded.project
    expert = make_member(project, Role.EXPERT, username="e2e-map-expert")
    first, second = two_clusters(seeded, committed)
    assert len(first) >= 4

    page.set_default_timeout(60_000)  # the machine may be busy: WebGL runs on the CPU here (SwiftShader)
    login(page, "e2e-map-expert", next_path=f"/projects/{project.pk}/map/")
    expect(page.locator("body")).to_have_attribute("data-map-ready", "true", timeout=30_000)
    expect(page.locator("#map-status")).to_contain_text(f"{len(first) + len(second)} patches")
    box = x0, y0, x1, y1 = cluster_box(page, len(first))
    others = np.array(page.evaluate(SCREEN_POSITIONS, list(range(len(first), len(first) + len(second)))))
    inside = (others[:, 0] > x0) & (others[:, 0] < x1) & (others[:, 1] > y0) & (others[:, 1] < y1)
    assert not inside.any(), "the clusters overlap on screen"

    # The lasso: Shift + drag around the first cluster's bounding box.
    lasso_box(page, box)
    expect(page.locator("#selection-count")).to_contain_text(f"({len(first)} patches", timeout=30_000)
    tiles = page.locator("#gallery .gallery-tile")
    expect(tiles.first).to_be_visible()
    left_out = int(tiles.first.get_attribute("data-id") or 0)
    tiles.first.click()
    expect(tiles.first).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Label all but 1 as benign").click()
    message = page.locator("#bulk-message")
    expect(message).to_contain_text(f"Labelled {len(first) - 1} patches as benign", timeout=60_000)
    screenshot(page, "map-lasso-labelled")
    # The left-out patch is now the selection, ready to be labelled next without another lasso.
    expect(page.locator("#selection-count")).to_contain_text("(1 patches)")
    expect(tiles).to_have_count(1)
    expect(tiles.first).to_have_attribute("data-id", str(left_out))
    expect(tiles.first).to_have_attribute("aria-pressed", "false")
    expect(page.get_by_role("button", name="Label all as squamous")).to_be_enabled()

    with committed():
        batch = VoteBatch.objects.get(project=project, annotator=expert)
        voted = set(Vote.objects.filter(batch=batch, is_active=True).values_list("patch_id", flat=True))
        assert voted == set(first) - {left_out}
        statuses = Consensus.objects.filter(patch_id__in=voted).values_list("status", "label__name")
        assert set(statuses) == {("expert", "benign")}
        assert not Vote.objects.filter(patch_id__in=[left_out, *second]).exists()

    # The map is recoloured from the new consensus: the labelled points now carry benign's code.
    page.wait_for_function("() => window.histoloopMap.map.consensus.some((c) => c > 0)", timeout=60_000)
    codes = page.evaluate("() => Array.from(window.histoloopMap.map.consensus)")
    benign_code = page.evaluate("() => window.histoloopMap.map.header.labels.find((l) => l.name === 'benign').code")
    assert sum(1 for c in codes if c == benign_code) == len(first) - 1

    page.get_by_role("button", name="Undo").click()
    expect(page.locator("#bulk-message")).to_contain_text(f"Undone: {len(first) - 1} votes retracted", timeout=60_000)
    with committed():
        assert not Vote.objects.filter(project=project, is_active=True).exists()
        assert set(Consensus.objects.filter(project=project).values_list("status", flat=True)) == {"pending"}


@pytest.mark.parametrize("renderer", ["cpu", "webgl"])
def test_both_renderers_draw_the_points_where_the_lasso_finds_them(
    page: Any, make_project: Any, make_member: Any, committed: Any, renderer: str
) -> None:
    """The plot draws with WebGL, or into a 2-D canvas's pixels where WebGL runs on the CPU (as here, so the
    WebGL path is asked for by name): either way each point is painted where getScreenPosition says, and a lasso
    there catches it."""
    from PIL import Image

    seeded = make_project(queue=False)
    make_member(seeded.project, Role.EXPERT, username=f"e2e-map-{renderer}")
    first, second = two_clusters(seeded, committed)
    page.set_default_timeout(60_000)
    login(page, f"e2e-map-{renderer}", next_path=f"/projects/{seeded.project.pk}/map/?renderer={renderer}")
    expect(page.locator("body")).to_have_attribute("data-map-ready", "true", timeout=30_000)
    expect(page.locator("#map-canvas")).to_have_attribute("data-renderer", renderer)
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    positions = page.evaluate(SCREEN_POSITIONS, list(range(len(first) + len(second))))
    painted = [shot.getpixel((round(x), round(y))) != (255, 255, 255) for x, y in positions]
    assert all(painted), f"{painted.count(False)} of {len(painted)} points are not drawn where they should be"
    box = cluster_box(page, len(first))
    assert shot.getpixel((round(box[0]) + 2, round(box[1]) + 2)) == (255, 255, 255), "the background is not white"
    lasso_box(page, box)
    expect(page.locator("#selection-count")).to_contain_text(f"({len(first)} patches", timeout=30_000)


def test_a_lasso_closed_on_a_point_keeps_what_it_caught(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    """Closing a lasso where it began is a click there too, which the plot takes for picking the point under
    the pointer; the lasso's selection must survive it."""
    seeded = make_project(queue=False)
    make_member(seeded.project, Role.EXPERT, username="e2e-map-closer")
    first, _ = two_clusters(seeded, committed)
    page.set_default_timeout(60_000)
    login(page, "e2e-map-closer", next_path=f"/projects/{seeded.project.pk}/map/")
    expect(page.locator("body")).to_have_attribute("data-map-ready", "true", timeout=30_000)
    positions = np.array(page.evaluate(SCREEN_POSITIONS, list(range(len(first)))))
    (x0, y0), (x1, y1) = positions.min(axis=0) - 12, positions.max(axis=0) + 12
    start = positions[int(np.argmin(positions[:, 0]))]  # the leftmost point: the stroke begins and ends on it
    page.keyboard.down("Shift")
    page.mouse.move(*start)
    page.mouse.down()
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), tuple(start)):
        page.mouse.move(x, y, steps=12)
        page.wait_for_timeout(25)
    page.mouse.up()
    page.keyboard.up("Shift")
    count = page.locator("#selection-count")
    expect(count).not_to_contain_text("(none", timeout=30_000)
    page.wait_for_timeout(1000)  # the plot's events arrive after timeouts: give a late pick time to land
    selected = page.evaluate("() => window.histoloopMap.selection.length")
    assert selected >= len(first) - 1, f"the lasso kept {selected} of {len(first)} points"
    expect(page.locator("#gallery .gallery-tile").first).to_be_visible()


def scored(seeded: Any, committed: Any, squamous: list[int]) -> None:
    """A model version that calls ``squamous`` squamous (sure) and every other patch benign, less and less
    sure with the patch id."""
    from learner import scores
    from learner.models import ModelVersion, TrainingRound

    ids = np.array([p.pk for p in seeded.patches], dtype=np.int64)
    top = np.linspace(0.95, 0.55, len(ids))
    proba = np.c_[top, 1 - top].astype(np.float32)
    marked = np.isin(ids, squamous)
    proba[marked] = [0.1, 0.9]
    with committed():
        round_ = TrainingRound.objects.create(project=seeded.project, number=1, state="succeeded")
        version = ModelVersion.objects.create(
            project=seeded.project, round=round_, backbone="b", train_mode="head", weights_path="unused.pt",
            class_names=["benign", "squamous"],
        )  # fmt: skip
        scores.write(version, ids, np.full(len(ids), seeded.slide.pk), proba)


def test_the_gallery_groups_the_models_misfits_and_a_shift_click_leaves_out_their_run(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    """After a round the gallery is ordered by the model's prediction, so the patches it calls another class sit
    together at the end: a click and a Shift + click leave them all out, and the labels' keys label the rest and
    then them."""
    seeded = make_project(queue=False)
    project = seeded.project
    make_member(project, Role.EXPERT, username="e2e-map-orderer")
    first, _ = two_clusters(seeded, committed)
    misfits = first[::3]  # spread over the cluster in patch order
    assert 2 <= len(misfits) < len(first) - 1
    scored(seeded, committed, misfits)

    page.set_default_timeout(60_000)
    login(page, "e2e-map-orderer", next_path=f"/projects/{project.pk}/map/")
    expect(page.locator("body")).to_have_attribute("data-map-ready", "true", timeout=30_000)
    lasso_box(page, cluster_box(page, len(first)))
    expect(page.locator("#selection-count")).to_contain_text(f"({len(first)} patches", timeout=30_000)

    shown = page.evaluate("() => window.histoloopMap.selection.map((i) => Number(window.histoloopMap.map.ids[i]))")
    rest = [p for p in first if p not in misfits]
    # Benign first, surest (lowest id here) first, then the squamous ones together.
    assert shown == rest + misfits
    expect(page.locator("#gallery .gallery-model").first).to_be_attached()

    page.evaluate("() => { const g = document.getElementById('gallery'); g.scrollTop = g.scrollHeight;"
                  " g.dispatchEvent(new Event('scroll')); }")  # fmt: skip
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[0]}']").click()
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[-1]}']").click(modifiers=["Shift"])
    expect(page.locator("#selection-count")).to_contain_text(f"{len(misfits)} left out")
    for pid in misfits:
        expect(page.locator(f"#gallery .gallery-tile[data-id='{pid}']")).to_have_attribute("aria-pressed", "true")
    # Shift + click from the anchor back over a left-out tile takes the run back to the anchor's state.
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[-1]}']").click()
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[-2]}']").click(modifiers=["Shift"])
    expect(page.locator("#selection-count")).to_contain_text(f"{len(misfits) - 2} left out")
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[-1]}']").click()
    page.locator(f"#gallery .gallery-tile[data-id='{misfits[-2]}']").click(modifiers=["Shift"])
    expect(page.locator("#selection-count")).to_contain_text(f"{len(misfits)} left out")

    page.keyboard.press("2")  # benign's key
    expect(page.locator("#bulk-message")).to_contain_text(f"Labelled {len(rest)} patches as benign", timeout=60_000)
    expect(page.locator("#selection-count")).to_contain_text(f"({len(misfits)} patches)")
    page.keyboard.press("3")  # squamous's key
    expect(page.locator("#bulk-message")).to_contain_text(f"Labelled {len(misfits)} patches as squamous")
    # The recoloured map reuses the points' k-d tree: a new lasso over the same place catches the same points.
    expect(page.locator("body")).to_have_attribute("data-map-ready", "true", timeout=60_000)
    page.evaluate("() => { window.histoloopMap.plot.deselect(); window.scrollTo(0, 0); }")
    lasso_box(page, cluster_box(page, len(first)))  # the box again: the page may have scrolled
    expect(page.locator("#selection-count")).to_contain_text(f"({len(first)} patches", timeout=30_000)
    with committed():
        labels = dict(Consensus.objects.filter(project=project).values_list("patch_id", "label__name"))
        assert {p: labels.get(p) for p in first} == {p: "squamous" if p in misfits else "benign" for p in first}
