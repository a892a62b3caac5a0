"""Interactions per label: a simulated pathologist labels LC25000 lung patches through the browser, in three modes.

    .venv/bin/python tests/bench/bench_labelling.py [--patches 600] [--baseline-labels 100] [--seed-labels 24]
        [--strip-size 100] [--lasso-points 60] [--round-after 0.3] [--modes one,strip,lasso] [--map-method pca]
        [--keep]

Everything is real: a scratch database on the server of DATABASE_URL (embedded PostgreSQL when unset) and
REDIS_URL, the ASGI server (``histoloop.serve``, 2 processes), a Celery worker on the gpu and cpu queues, and
Debian's Chromium driven by Playwright. ``--patches`` LC25000 lung images (equal per class, seeded) are
ingested once, as ``manage.py simulate`` does (one slide with one patch per image), and embedded by the
round's own code path; each mode then labels a bulk copy of that pool in a project of its own, as its admin.

The pathologist knows every patch's true class and follows a fixed policy; every key press, click, lasso
stroke and scroll (one per screenful of tiles beyond the first: the pathologist looks at every tile) is
counted. Label accuracy is the final consensus against the truth.

1. ``one``: the annotator page, one key per patch (the baseline), for ``--baseline-labels`` patches.
2. ``strip``: a cold-start round (Start round on the dashboard with no labels: the worker queues a batch
   spread over the embedding space), ``--seed-labels`` of it one at a time in the annotator, a round, then
   the accept-the-model strip class by class (``--strip-size`` patches, most confident first): a wrong tile
   is focused (one arrow when it is the next one, else a click) and given its class by its digit key, Enter
   accepts the strip. Whenever the labels have grown by half since the last round, another round is started
   from the dashboard (counted: the tab switch, the click, back); the strips after it use its model.
3. ``lasso``: the embedding map (its layout by the worker's ``compute_embedding_map``). The pathologist
   divides the point cloud as seen on screen into regions of about ``--lasso-points`` points (k-means on the
   points' screen positions: the map is still grey, so nothing but where the points lie guides it) and lassoes
   each region along its cell's boundary (Shift + drag, one stroke); in the gallery the tiles whose class is
   not the region's majority are left out (a click for a lone tile, a click and a Shift + click for a run of
   neighbours in the gallery's order) and the majority class's key labels the rest; the left-out ones stay in
   the gallery and are labelled the same way (majority, leave out the others, key). Once ``--round-after`` of
   the regions are labelled, a round is started from the dashboard (counted: the link there, Start round, the
   link back); its model orders the later galleries by prediction, surest first, so the misfits sit together.
   Patches no lasso caught are labelled one at a time in the annotator at the end.

The map at 200,000 points (first paint, a lasso of 5,000) is timed by bench_map_browser.py.

Goal (issue 14): >= 5x fewer interactions per label than one at a time, at >= 0.97 label accuracy.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.e2e.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.servers import asgi_server, celery_worker  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lc25000_lung"
VIEWPORT = {"width": 1920, "height": 1080}  # a pathologist's ordinary monitor
GOAL_RATIO = 5.0
GOAL_ACCURACY = 0.97


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def say(message: str) -> None:
    print(message, flush=True)


# --- counting -------------------------------------------------------------------------------------------------------


@dataclass
class Interactions:
    """What the pathologist did with hands: every call here is one key press, click, lasso stroke or scroll."""

    keys: int = 0
    clicks: int = 0
    lassos: int = 0
    scrolls: int = 0

    @property
    def total(self) -> int:
        return self.keys + self.clicks + self.lassos + self.scrolls

    def press(self, page: Any, key: str) -> None:
        page.keyboard.press(key)
        self.keys += 1

    def click(self, target: Any) -> None:
        target.click()
        self.clicks += 1

    def as_dict(self) -> dict[str, int]:
        return {"keys": self.keys, "clicks": self.clicks, "lassos": self.lassos, "scrolls": self.scrolls}


@dataclass
class ModeResult:
    mode: str
    interactions: Interactions
    labels: int  # patches with a final consensus label
    correct: int
    pool: int
    seconds: float
    load: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def per_label(self) -> float:
        return self.interactions.total / max(1, self.labels)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.labels)

    def line(self, baseline: float | None) -> str:
        ratio = f", {baseline / self.per_label:5.1f}x fewer than one at a time" if baseline and self.per_label else ""
        i = self.interactions
        return (
            f"{self.mode:<7} {self.labels:>5} labels of {self.pool} ({self.labels / max(1, self.pool):.0%}), accuracy "
            f"{self.accuracy:.3f}; {i.total} interactions ({i.keys} keys, {i.clicks} clicks, {i.lassos} lassos, "
            f"{i.scrolls} scrolls) = {self.per_label:.3f} per label{ratio}; {self.seconds:.0f} s, load {self.load}"
        )

    def as_dict(self, baseline: float | None) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "labels": self.labels,
            "pool": self.pool,
            "accuracy": round(self.accuracy, 4),
            "interactions": self.interactions.total,
            **self.interactions.as_dict(),
            "per_label": round(self.per_label, 4),
            "ratio_to_one_at_a_time": round(baseline / self.per_label, 2) if baseline and self.per_label else None,
            "seconds": round(self.seconds, 1),
            "load": self.load,
            **self.notes,
        }


# --- the data -------------------------------------------------------------------------------------------------------


def pick_items(n: int, seed: int) -> list[Any]:
    """``n`` LC25000 lung images, the same number from each class, drawn at random (seeded)."""
    from learner import simulation as sim

    items = sim.read_items(DATA / "manifest.csv")
    by_class: dict[str, list[Any]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    rng = np.random.default_rng(seed)
    per_class = max(1, n // len(by_class))
    picked: list[Any] = []
    for label in sorted(by_class):
        pool = by_class[label]
        picked.extend(pool[i] for i in sorted(rng.choice(len(pool), size=min(per_class, len(pool)), replace=False)))
    return picked


@dataclass
class Pool:
    """One mode's project: a bulk copy of the source rows, with every patch's true class."""

    project: Any
    truth: dict[int, str]  # patch id -> class name
    hotkeys: dict[str, str]  # class name -> key


def pool_project(source: Any, name: str, user: Any, **fields: Any) -> Pool:
    from annotations.models import LabelClass, Membership, Role
    from learner import simulation as sim
    from tests.factories import queue_every_patch

    rows = np.arange(len(source))
    project, row_of = sim.clone_pool(
        source, rows, set(), name, gold_rate=0.0, random_fraction=0.0, description="bench_labelling", **fields
    )
    Membership.objects.create(user=user, project=project, role=Role.ADMIN)
    queue_every_patch(project)
    hotkeys = dict(LabelClass.objects.filter(project=project).values_list("name", "hotkey"))
    truth = {pid: source.class_names[int(source.labels[r])] for pid, r in row_of.items()}
    return Pool(project=project, truth=truth, hotkeys=hotkeys)


def final_labels(pool: Pool) -> tuple[int, int]:
    """(patches with a final consensus label, of which right)."""
    from annotations.models import Consensus

    rows = Consensus.objects.filter(
        project=pool.project, status__in=(Consensus.Status.AGREED, Consensus.Status.EXPERT), label__isnull=False
    ).values_list("patch_id", "label__name")
    labelled = dict(rows)
    return len(labelled), sum(1 for pid, name in labelled.items() if pool.truth.get(pid) == name)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def votes_settled(pool: Pool, expected: int, timeout: float = 120) -> None:
    """The page sends votes in the background: wait until the server has them all."""
    from annotations.models import Vote

    wait_until(
        lambda: Vote.objects.filter(project=pool.project, is_active=True).count() >= expected,
        timeout,
        f"{expected} votes to reach the server",
    )


# --- the processes --------------------------------------------------------------------------------------------------


def session_cookie(user: Any) -> dict[str, str]:
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return {"name": settings.SESSION_COOKIE_NAME, "value": client.cookies[settings.SESSION_COOKIE_NAME].value}


class Browser:
    """Fresh contexts (cold cache) logged in as the pathologist; page errors are collected and fail the run."""

    def __init__(self, playwright: Any, base: str, cookie: dict[str, str]) -> None:
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        self.base = base
        self.cookie = cookie
        self.errors: list[str] = []
        self.ignore: Callable[[str], bool] | None = None  # console errors a benchmark expects

    def context(self, viewport: dict[str, int] = VIEWPORT) -> Any:
        context = self.browser.new_context(base_url=self.base, viewport=viewport)
        context.add_cookies([{**self.cookie, "url": self.base}])
        context.set_default_timeout(120_000)
        return context

    def page(self, context: Any) -> Any:
        page = context.new_page()
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)
        return page

    def _console(self, message: Any) -> None:
        if message.type == "error":
            text = f"console error: {message.text} ({(message.location or {}).get('url', '')})"
            if not (self.ignore and self.ignore(text)):
                self.errors.append(text)

    def check(self) -> None:
        if self.errors:
            raise RuntimeError("the browser reported errors:\n" + "\n".join(self.errors[:20]))

    def close(self) -> None:
        self.browser.close()


# --- mode 1: one at a time ------------------------------------------------------------------------------------------

NEXT_SHOWN = """(before) => {
    const a = document.getElementById("annotator");
    return (a.dataset.patch !== before && a.dataset.state === "ready") || a.dataset.state === "empty";
}"""


def annotate(page: Any, pool: Pool, counter: Interactions, limit: int) -> int:
    """Label up to ``limit`` patches in the annotator page (already open), one key each; returns how many."""
    page.wait_for_selector("#annotator[data-state='ready'], #annotator[data-state='empty']")
    done = 0
    while done < limit:
        if page.get_attribute("#annotator", "data-state") == "empty":
            break
        patch = page.get_attribute("#annotator", "data-patch")
        counter.press(page, pool.hotkeys[pool.truth[int(patch or 0)]])
        done += 1
        page.wait_for_function(NEXT_SHOWN, arg=patch)
    return done


def mode_one(browser: Browser, pool: Pool, n: int) -> ModeResult:
    started, counter = time.monotonic(), Interactions()
    context = browser.context()
    page = browser.page(context)
    page.goto(f"/projects/{pool.project.pk}/annotate/")
    done = annotate(page, pool, counter, n)
    votes_settled(pool, done)
    context.close()
    labels, correct = final_labels(pool)
    return ModeResult("one", counter, labels, correct, len(pool.truth), time.monotonic() - started, load())


# --- mode 2: accept the model ---------------------------------------------------------------------------------------


def run_round(dashboard: Any, pool: Pool, counter: Interactions) -> dict[str, Any]:
    """Start round on the dashboard (one click); the worker runs it; returns its metrics."""
    from learner.models import TrainingRound

    before = TrainingRound.objects.filter(project=pool.project).count()
    start = dashboard.get_by_role("button", name="Start round")
    dashboard.wait_for_function("() => !document.getElementById('start-round').disabled")
    counter.click(start)
    round_ = wait_until(
        lambda: TrainingRound.objects.filter(
            project=pool.project, number__gt=before, state__in=("succeeded", "failed", "cancelled")
        ).first(),
        900,
        "the round",
        1.0,
    )
    if round_.state != "succeeded":
        raise RuntimeError(f"round {round_.number} {round_.state}: {round_.error}")
    dashboard.wait_for_selector("#round-live[data-state='succeeded']")
    return dict(round_.metrics)


STRIP_TILES = """() => {
    const tiles = [...document.querySelectorAll("#strip .strip-tile")];
    const top = tiles.length ? tiles[0].offsetTop : 0;
    let columns = 0;
    while (columns < tiles.length && tiles[columns].offsetTop === top) columns += 1;
    const strip = document.getElementById("strip");
    const bottom = strip.getBoundingClientRect().bottom + window.scrollY;
    return {
        ids: tiles.map((t) => Number(t.dataset.patch)),
        columns: Math.max(1, columns),
        screens: Math.max(1, Math.ceil(bottom / window.innerHeight)),
        label: document.getElementById("strip-class").textContent,
    };
}"""
STRIP_SETTLED = "() => ['ready', 'empty', 'error'].includes(document.getElementById('strip').dataset.state)"


def reloading_strip(page: Any, action: Callable[[], None]) -> None:
    """Do ``action`` (which makes the page load a strip) and wait until the new strip is on screen."""
    with page.expect_response(lambda r: "/suggestions/?" in r.url and r.request.method == "GET", timeout=300_000):
        action()
    page.wait_for_function(STRIP_SETTLED)
    error = page.locator("#strip-error")
    if error.is_visible():
        raise RuntimeError(f"the strip reported: {error.text_content()}")


def work_strip(page: Any, pool: Pool, counter: Interactions) -> tuple[int, int]:
    """Correct and accept the strip on screen; returns (patches labelled, corrections)."""
    shown = page.evaluate(STRIP_TILES)
    ids, columns, label = shown["ids"], shown["columns"], shown["label"]
    counter.scrolls += shown["screens"] - 1
    focus = 0
    corrections = 0
    for index, pid in enumerate(ids):
        truth = pool.truth[pid]
        if truth == label:
            continue
        # One arrow reaches the next tile or the one below; anything further is one click on the tile.
        if index - focus == 1:
            counter.press(page, "ArrowRight")
        elif index - focus == columns:
            counter.press(page, "ArrowDown")
        elif index != focus:
            counter.click(page.locator(f"#strip .strip-tile[data-patch='{pid}']"))
        focus = index
        counter.press(page, pool.hotkeys[truth])
        corrections += 1
    page.wait_for_function(
        "([i, f]) => document.getElementById('strip').dataset.focus === String(i)"
        " && document.querySelectorAll('#strip .strip-tile[data-decision=\"flipped\"]').length === f",
        arg=[focus, corrections],
    )
    reloading_strip(page, lambda: counter.press(page, "Enter"))
    return len(ids), corrections


def mode_strip(browser: Browser, pool: Pool, seeds: int, strip_size: int) -> ModeResult:
    from annotations.models import Vote

    started, counter = time.monotonic(), Interactions()
    context = browser.context()
    # The dashboard (kept open in its own tab for the rounds): a first round with no labels is the platform's
    # cold start, which queues a batch spread over the embedding space, so the seed labels are diverse.
    dashboard = browser.page(context)
    dashboard.goto(f"/projects/{pool.project.pk}/dashboard/")
    run_round(dashboard, pool, counter)
    page = browser.page(context)
    counter.clicks += 1  # opening the annotator in a second tab
    page.goto(f"/projects/{pool.project.pk}/annotate/")
    seeded = annotate(page, pool, counter, seeds)
    votes_settled(pool, seeded)
    counter.clicks += 1  # to the dashboard's tab
    dashboard.bring_to_front()
    rounds = [run_round(dashboard, pool, counter)]
    labels_at_round = seeded
    counter.clicks += 1  # back to the annotator's tab
    page.bring_to_front()
    counter.click(page.get_by_role("link", name="Accept the model"))
    page.wait_for_selector("#strip[data-state='ready'], #strip[data-state='empty']")
    # The strip's size: click the field, select its text, type the number, Tab.
    counter.click(page.locator("#strip-n"))
    counter.press(page, "Control+A")
    for digit in str(strip_size):
        counter.press(page, digit)
    reloading_strip(page, lambda: counter.press(page, "Tab"))
    strips = corrections = 0
    classes = list(pool.hotkeys)
    current = page.input_value("#strip-label")
    while True:
        labelled_any = False
        for name in classes:
            if name != current:
                # Another class: open the drop-down, pick it (two clicks).
                counter.clicks += 2
                reloading_strip(page, partial(page.select_option, "#strip-label", name))
                current = name
            while page.get_attribute("#strip", "data-state") == "ready":
                _, fixed = work_strip(page, pool, counter)
                strips += 1
                corrections += fixed
                labelled_any = True
                voted = Vote.objects.filter(project=pool.project, is_active=True).count()
                if voted >= 1.5 * labels_at_round and voted < len(pool.truth):
                    counter.clicks += 1  # to the dashboard's tab
                    dashboard.bring_to_front()
                    rounds.append(run_round(dashboard, pool, counter))
                    labels_at_round = voted
                    counter.clicks += 1  # back
                    page.bring_to_front()
        if not labelled_any:
            break
    context.close()
    labels, correct = final_labels(pool)
    accuracy = [r.get("balanced_accuracy") or r.get("accuracy") for r in rounds]
    notes = {"rounds": len(rounds), "strips": strips, "corrections": corrections, "seed_labels": seeded,
             "round_validation_accuracy": accuracy}  # fmt: skip
    return ModeResult("strip", counter, labels, correct, len(pool.truth), time.monotonic() - started, load(), notes)


# --- mode 3: lasso on the map ---------------------------------------------------------------------------------------

SCREEN = """() => {
    const m = window.histoloopMap;
    const box = document.getElementById("map-canvas").getBoundingClientRect();
    const out = [];
    for (let i = 0; i < m.map.count; i += 1) {
        const [x, y] = m.plot.getScreenPosition(i);
        out.push([box.left + x, box.top + y]);
    }
    return {ids: Array.from(m.map.ids), xy: out, box: [box.left, box.top, box.right, box.bottom]};
}"""
GALLERY = """() => {
    const m = window.histoloopMap;
    const g = document.getElementById("gallery");
    const tile = 88 + 4;
    const columns = Math.max(1, Math.floor((g.clientWidth - 4) / tile));
    return {
        ids: m.selection.map((i) => Number(m.map.ids[i])),
        columns,
        rows_per_screen: Math.max(1, Math.floor(g.clientHeight / tile)),
    };
}"""


def cell_polygon(centres: np.ndarray, k: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """The Voronoi cell of centre ``k`` clipped to ``box`` (x0, y0, x1, y1): a convex polygon (n, 2)."""
    x0, y0, x1, y1 = box
    poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    c = centres[k]
    for j, other in enumerate(centres):
        if j == k or not len(poly):
            continue
        # Keep the half-plane nearer c than other: (p - mid) . (other - c) <= 0.
        normal, mid = other - c, (other + c) / 2
        side = (poly - mid) @ normal
        out = []
        for i in range(len(poly)):
            p, q, sp, sq = poly[i], poly[(i + 1) % len(poly)], side[i], side[(i + 1) % len(poly)]
            if sp <= 0:
                out.append(p)
            if (sp <= 0) != (sq <= 0):
                out.append(p + (q - p) * (sp / (sp - sq)))
        poly = np.array(out)
    return poly


def inside_convex(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which ``points`` lie inside the convex ``polygon`` (vertices in order, either orientation)."""
    edges = np.roll(polygon, -1, axis=0) - polygon
    rel = points[:, None, :] - polygon[None, :, :]
    cross = edges[None, :, 0] * rel[:, :, 1] - edges[None, :, 1] * rel[:, :, 0]
    return np.all(cross >= 0, axis=1) | np.all(cross <= 0, axis=1)


def lasso(page: Any, polygon: np.ndarray, counter: Interactions) -> None:
    """One Shift + drag stroke along ``polygon``; a pause at each corner lets the lasso keep it (the lasso
    samples the pointer at most every few milliseconds)."""
    page.keyboard.down("Shift")
    page.mouse.move(*polygon[0])
    page.mouse.down()
    for x, y in [*polygon[1:], polygon[0]]:
        page.mouse.move(x, y, steps=8)
        page.wait_for_timeout(25)
    page.mouse.up()
    page.keyboard.up("Shift")
    counter.lassos += 1


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """The maximal runs (first, last) of consecutive True ``flags``."""
    out: list[tuple[int, int]] = []
    for k, flag in enumerate(flags):
        if flag and out and out[-1][1] == k - 1:
            out[-1] = (out[-1][0], k)
        elif flag:
            out.append((k, k))
    return out


def scroll_gallery_to(page: Any, row: int, rows_per_screen: int) -> None:
    """Bring the screenful holding ``row`` into view (not counted: the pathologist already scrolls past every
    screenful once, counted in label_gallery)."""
    page.evaluate(
        "(top) => { const g = document.getElementById('gallery'); if (Math.abs(g.scrollTop - top) > 1) "
        "{ g.scrollTop = top; g.dispatchEvent(new Event('scroll')); } }",
        (row // rows_per_screen) * rows_per_screen * 92,
    )


def label_gallery(page: Any, pool: Pool, counter: Interactions) -> int:
    """Work the gallery until its selection is labelled: majority class, leave out the others, label by the
    class's key; the left-out ones stay selected for the next pass. Leaving out is one click for a lone tile
    and two for a run of neighbours in the gallery's order (a click on its first, Shift + click on its last:
    the gallery is ordered by the model's prediction once there is one, so its misfits sit together).
    Returns the bulk actions made."""
    actions = 0
    while True:
        shown = page.evaluate(GALLERY)
        ids = shown["ids"]
        if not ids:
            return actions
        majority, _ = Counter(pool.truth[p] for p in ids).most_common(1)[0]
        rows = math.ceil(len(ids) / shown["columns"])
        screens = math.ceil(rows / shown["rows_per_screen"])
        counter.scrolls += screens - 1
        others = [k for k, p in enumerate(ids) if pool.truth[p] != majority]
        for first, last in runs([pool.truth[p] != majority for p in ids]):
            scroll_gallery_to(page, first // shown["columns"], shown["rows_per_screen"])
            counter.click(page.locator(f"#gallery .gallery-tile[data-id='{ids[first]}']"))
            if last > first:
                scroll_gallery_to(page, last // shown["columns"], shown["rows_per_screen"])
                page.locator(f"#gallery .gallery-tile[data-id='{ids[last]}']").click(modifiers=["Shift"])
                counter.clicks += 1
        page.wait_for_function(
            "(n) => document.querySelectorAll('#gallery .gallery-tile.excluded').length >= 0 && "
            "document.getElementById('selection-count').textContent.includes(n ? `${n} left out` : 'patches')",
            arg=len(others),
        )
        before = page.locator("#bulk-message").text_content() or ""
        name = f"Label all but {len(others)} as {majority}" if others else f"Label all as {majority}"
        page.wait_for_function("(name) => [...document.querySelectorAll('#bulk-actions button')]"
                               ".some((b) => b.textContent === name && !b.disabled)", arg=name)  # fmt: skip
        counter.press(page, pool.hotkeys[majority])
        page.wait_for_function(
            "(before) => { const m = document.getElementById('bulk-message');"
            " const e = document.getElementById('bulk-error');"
            " return (!m.hidden && m.textContent !== before) || !e.hidden; }",
            arg=before,
        )
        error = page.locator("#bulk-error")
        if error.is_visible():
            raise RuntimeError(f"the map reported: {error.text_content()}")
        actions += 1
        page.wait_for_function("(n) => window.histoloopMap.selection.length === n", arg=len(others))


SUBSCRIBE = (
    "() => { const p = window.histoloopMap.plot; p.subscribe('select', () => { window.benchSelected = true; });"
    " p.subscribe('deselect', () => { window.benchSelected = false; }); }"
)


def open_map_page(page: Any) -> None:
    page.wait_for_selector("body[data-map-ready='true']")
    # Told when the plot reports a lasso's selection (or that it selected nothing).
    page.evaluate(SUBSCRIBE)


def mode_lasso(browser: Browser, pool: Pool, lasso_points: int, round_after: float) -> ModeResult:
    from sklearn.cluster import KMeans

    from annotations.models import Vote
    from learner.models import EmbeddingMap
    from learner.tasks import compute_embedding_map

    started, counter = time.monotonic(), Interactions()
    # Set-up, not labelling: the worker lays the map out (as a round or an admin's button would).
    compute_embedding_map.delay(pool.project.pk, True)
    wait_until(lambda: EmbeddingMap.objects.filter(project=pool.project).exists(), 900, "the map layout", 1.0)
    context = browser.context()
    page = browser.page(context)
    page.goto(f"/projects/{pool.project.pk}/map/")
    open_map_page(page)
    seen = page.evaluate(SCREEN)
    ids = np.array(seen["ids"], dtype=np.int64)
    xy = np.array(seen["xy"], dtype=np.float64)
    k = max(1, round(len(ids) / lasso_points))
    kmeans = KMeans(n_clusters=k, n_init=4, random_state=0).fit(xy)
    left, top, right, bottom = seen["box"]
    # The cells' outer edges a little inside the canvas (a stroke that leaves it is not the lasso's).
    box = (left + 3, top + 3, right - 3, bottom - 3)
    purity = []
    caught: list[tuple[int, int]] = []  # per stroke: points inside it on screen, points the plot selected
    actions = 0
    round_at = math.ceil(k * round_after) if round_after > 0 else None
    rounds: list[dict[str, Any]] = []
    for cell in range(k):
        if cell == round_at:
            # A model for the rest: to the dashboard, Start round, and back to the map once it is done; the map
            # then orders each gallery by the model's prediction. The layout stays (the same pool).
            page.wait_for_selector("body[data-map-ready='true']")
            counter.click(page.get_by_role("link", name="Dashboard"))
            rounds.append(run_round(page, pool, counter))
            counter.click(page.get_by_role("link", name="Map"))
            open_map_page(page)
            again = np.array(page.evaluate(SCREEN)["xy"], dtype=np.float64)
            if np.abs(again - xy).max() > 1:
                raise RuntimeError("the map's points moved after the round: the regions no longer fit them")
        members = ids[kmeans.labels_ == cell]
        if not len(members):
            continue
        purity.append(Counter(pool.truth[int(p)] for p in members).most_common(1)[0][1] / len(members))
        polygon = cell_polygon(kmeans.cluster_centers_, cell, box)
        if len(polygon) < 3:
            continue
        page.wait_for_selector("body[data-map-ready='true']")  # a stroke during a redraw is ignored
        inside = int(inside_convex(xy, polygon).sum())
        page.evaluate("() => { window.benchSelected = null; }")
        lasso(page, polygon, counter)
        page.wait_for_function("() => window.benchSelected !== null", timeout=60_000)
        caught.append((inside, len(page.evaluate(GALLERY)["ids"])))
        actions += label_gallery(page, pool, counter)
    voted = Vote.objects.filter(project=pool.project, is_active=True).values("patch_id").distinct().count()
    missed = len(pool.truth) - voted
    if missed:
        # Fix what no lasso caught: one at a time in the annotator (its queue leaves out what the user labelled).
        page.wait_for_selector("body[data-map-ready='true']")
        counter.click(page.get_by_role("link", name="Annotate"))
        done = annotate(page, pool, counter, missed)
        votes_settled(pool, voted + done)
    context.close()
    labels, correct = final_labels(pool)
    accuracy = [r.get("balanced_accuracy") or r.get("accuracy") for r in rounds]
    notes = {"lasso_regions": k, "bulk_actions": actions, "missed_by_lassos": missed, "round_after_region": round_at,
             "round_validation_accuracy": accuracy,
             "region_purity_mean": round(float(np.mean(purity)), 3), "stroke_inside_vs_selected": caught}  # fmt: skip
    return ModeResult("lasso", counter, labels, correct, len(pool.truth), time.monotonic() - started, load(), notes)


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=600, help="LC25000 images in the pool (equal per class)")
    parser.add_argument("--baseline-labels", type=int, default=100, help="patches labelled one at a time")
    parser.add_argument("--seed-labels", type=int, default=24, help="one-at-a-time labels before the first round")
    parser.add_argument("--strip-size", type=int, default=100, help="patches per strip (the page allows 200)")
    parser.add_argument("--lasso-points", type=int, default=60, help="points per lassoed region, about")
    parser.add_argument(
        "--round-after",
        type=float,
        default=0.3,
        help="lasso mode: start a round once this share of the regions is labelled (0: never)",
    )
    parser.add_argument("--modes", default="one,strip,lasso")
    parser.add_argument("--map-method", default="pca", help="the lasso mode's layout: pca (default) or umap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print("Chromium is missing: run `make chromium`.", file=sys.stderr)
        return 2
    if not DATA.is_dir():
        print(f"LC25000 is missing: {DATA}", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]

    embedded.ensure_environment()
    scratch = Path(tempfile.mkdtemp(prefix="bench_labelling_"))
    os.environ["MEDIA_ROOT"] = str(scratch / "media")
    os.environ["LEARNER_WEIGHTS_DIR"] = str(scratch / "models")
    # Embeddings are keyed by the image's checksum and the backbone: a later run reuses them.
    os.environ.setdefault("LEARNER_CACHE_DIR", str(REPO / "var" / "cache"))
    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ["DATABASE_POOL"] = "0"
    os.environ["LEARNER_MAP_METHOD"] = args.map_method  # read by the worker that lays the map out
    from tests.bench.bench_scale import scratch_database

    out: dict[str, Any] = {"cores": os.cpu_count(), "viewport": VIEWPORT, "modes": []}
    try:
        with scratch_database(args.keep, prefix="bench_labelling") as url:
            os.environ["DATABASE_URL"] = url
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's loop shares this thread with the ORM
            import django

            django.setup()
            out.update(run(args, modes, url, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out))
    return 0


def run(args: argparse.Namespace, modes: list[str], url: str, scratch: Path) -> dict[str, Any]:
    from django.conf import settings
    from django.core.management import call_command
    from playwright.sync_api import sync_playwright

    from learner import simulation as sim
    from tests import servers
    from tests.factories import UserFactory

    call_command("migrate", verbosity=0)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    say(f"{os.cpu_count()} cores, load {load()}; viewport {VIEWPORT['width']}x{VIEWPORT['height']}")
    t0 = time.monotonic()
    items = pick_items(args.patches, args.seed)
    source = sim.source_project(items, "bench labelling source", progress=say)
    say(f"ingested {len(source)} distinct images of {len(items)} ({time.monotonic() - t0:.0f} s)")
    t0 = time.monotonic()
    sim.source_embeddings(source, progress=say)
    say(f"embedded them ({time.monotonic() - t0:.0f} s), load {load()}")
    pathologist = UserFactory(username="bench-pathologist")
    env = servers.server_env(url)
    results: list[ModeResult] = []
    figures: dict[str, Any] = {"pool": len(source)}
    with (
        asgi_server(env, scratch / "server.log", workers=2, timeout=600) as port,
        celery_worker(env, scratch / "worker.log", name=f"bench-labelling-{os.getpid()}@%h"),
        sync_playwright() as playwright,
    ):
        browser = Browser(playwright, f"http://127.0.0.1:{port}", session_cookie(pathologist))
        try:
            for mode in modes:
                pool = pool_project(source, f"bench labelling {mode}", pathologist)
                say(f"mode {mode}: {len(pool.truth)} patches, load {load()}")
                if mode == "one":
                    result = mode_one(browser, pool, args.baseline_labels)
                elif mode == "strip":
                    result = mode_strip(browser, pool, args.seed_labels, args.strip_size)
                elif mode == "lasso":
                    result = mode_lasso(browser, pool, args.lasso_points, args.round_after)
                else:
                    raise SystemExit(f"unknown mode {mode!r}; use one, strip, lasso")
                browser.check()
                results.append(result)
                say("  " + result.line(None) + (f"; {result.notes}" if result.notes else ""))
        finally:
            browser.close()
    baseline = next((r.per_label for r in results if r.mode == "one"), None)
    say("\nInteractions per final label (keys + clicks + lasso strokes + scrolls), accuracy against the truth:")
    for result in results:
        say("  " + result.line(baseline))
    for result in results:
        if result.mode != "one" and baseline:
            met = baseline / result.per_label >= GOAL_RATIO and result.accuracy >= GOAL_ACCURACY
            say(
                f"  goal (>= {GOAL_RATIO:.0f}x fewer, accuracy >= {GOAL_ACCURACY}) for {result.mode}: "
                f"{'met' if met else 'NOT met'} ({baseline / result.per_label:.1f}x, {result.accuracy:.3f})"
            )
    figures["modes"] = [r.as_dict(baseline) for r in results]
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
