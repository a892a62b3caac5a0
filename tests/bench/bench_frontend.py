"""Browser-side latency of the annotator and the slide viewer, through the real ASGI server.

    .venv/bin/python tests/bench/bench_frontend.py [--votes 50] [--think 0.4] [--opens 5]

Uses DATABASE_URL/REDIS_URL like manage.py (embedded services when unset) and a throw-away
MEDIA_ROOT; creates a bench project from cmu-1-small-region.svs, runs the ASGI server and Debian's
Chromium (headless, via Playwright), and removes what it made at the end.

- Annotator: time from the keydown of a label hotkey to the frame that shows the next patch,
  measured in the page (performance.now() in the key handler → after the next paint), over
  ``--votes`` votes, with the lease ahead (the page holds a second task whose images are decoded
  off-screen, swapped in at the keypress) and without it (the baseline: Playwright routing drops
  ``ahead`` from the page's next-task and vote requests, so the server never leases one ahead and
  each vote waits for the next task and its images, as the page does when the queue has nothing
  to hold ahead). Both modes pass their requests through the same routing, so the interception
  costs both alike. Each mode has its own annotator so both see fresh patches; ``--think``
  seconds pass between votes.
- Viewer: time from navigation start until every tile of the first field of view is drawn
  (OpenSeadragon's ``fully-loaded-change``), each open in a fresh browser context (cold browser
  cache); the first open also meets a cold server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histoloop import embedded  # noqa: E402
from tests.e2e.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.servers import asgi_server  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def describe(name: str, values: list[float]) -> str:
    return (
        f"{name:<44} n={len(values):>3}  median {statistics.median(values):7.1f} ms  "
        f"p95 {percentile(values, 95):7.1f} ms  min {min(values):6.1f}  max {max(values):7.1f}"
    )


# The annotator's requests that can ask for a lease ahead: next-task/?ahead=1 and a vote's "ahead": true.
LEASING = re.compile(r"/api/v1/projects/\d+/(next-task|votes)/(\?.*)?$")


def route_leasing(page: Any, *, ahead: bool) -> None:
    """Routes the leasing requests through Playwright; without ``ahead`` they stop asking for a
    lease ahead (the server then leases none), which is the baseline's only difference."""

    def handle(route: Any, request: Any) -> None:
        if ahead:
            route.continue_()
            return
        parts = urlsplit(request.url)
        url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "ahead"])))
        if request.method == "POST" and parts.path.endswith("/votes/") and request.post_data:
            body = json.loads(request.post_data)
            body.pop("ahead", None)
            route.continue_(url=url, post_data=json.dumps(body))
        else:
            route.continue_(url=url)

    page.route(LEASING, handle)


def annotate(
    browser: Any, base: str, cookie: dict, project_id: int, *, ahead: bool, votes: int, think: float
) -> list[dict]:
    context = browser.new_context(base_url=base, viewport={"width": 1366, "height": 768})
    context.add_cookies([{**cookie, "url": base}])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    route_leasing(page, ahead=ahead)
    page.goto(f"/projects/{project_id}/annotate/")
    page.wait_for_selector("#annotator[data-state='ready']")
    for i in range(votes):
        time.sleep(think)
        before = page.get_attribute("#annotator", "data-patch")
        page.keyboard.press(str(1 + i % 2))
        page.wait_for_function(
            """(before) => {
                const a = document.getElementById("annotator");
                return a.dataset.patch !== before && a.dataset.state !== "busy" || a.dataset.state === "empty";
            }""",
            arg=before,
        )
        if page.get_attribute("#annotator", "data-state") == "empty":
            break
    result = page.evaluate("window.histoloopMetrics.votes")
    context.close()
    if errors:
        raise RuntimeError(f"page errors: {errors}")
    # Without the lease ahead no vote may have been swapped in from a task held ahead, or the
    # baseline would not be one.
    if not ahead and any(r["ahead"] for r in result):
        raise RuntimeError("the baseline run still showed tasks leased ahead: the routing missed a request")
    return result


def open_viewer(browser: Any, base: str, cookie: dict, project_id: int, slide_id: int) -> dict:
    context = browser.new_context(base_url=base, viewport={"width": 1366, "height": 768})
    context.add_cookies([{**cookie, "url": base}])
    page = context.new_page()
    page.goto(f"/projects/{project_id}/viewer/{slide_id}/")
    page.wait_for_selector("#osd[data-state='loaded']", timeout=60_000)
    result = page.evaluate(
        "({ms: window.histoloopMetrics.viewerFullyLoadedMs, tiles: window.histoloopMetrics.tilesLoaded})"
    )
    context.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", default=str(REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"))
    parser.add_argument("--votes", type=int, default=50)
    parser.add_argument("--think", type=float, default=0.4, help="seconds between votes (an annotator looks first)")
    parser.add_argument("--opens", type=int, default=5, help="viewer opens, each in a fresh browser context")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print("Chromium is missing: run `make chromium`.", file=sys.stderr)
        return 2

    embedded.ensure_environment()
    media = Path(tempfile.mkdtemp(prefix="histoloop-bench-frontend-"))
    os.environ["MEDIA_ROOT"] = str(media)
    # Importing histoloop (its Celery app) already set DJANGO_SETTINGS_MODULE, so also say DEBUG=1 here.
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # DEBUG=1, as in the tests
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's loop shares this thread with the ORM
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client
    from playwright.sync_api import sync_playwright

    from annotations.models import Role, Vote
    from annotations.slides import ingest
    from tests.factories import ProjectFactory, member, queue_every_patch

    call_command("migrate", verbosity=0)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    stamp = f"{os.getpid()}-{int(time.time())}"
    project = ProjectFactory(name=f"bench-frontend-{stamp}", gold_rate=0.0, votes_required=3)
    users = {mode: member(project, Role.CROWD, username=f"bench-annotator-{mode}-{stamp}") for mode in ("on", "off")}
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    log = media / "server.log"
    try:
        slide = ingest.ingest(ingest.add_slide_from_path(project, Path(args.slide), launch=False).pk)
        assert slide is not None and slide.status == "ready", slide and slide.error
        n_tasks = queue_every_patch(project)
        cookies = {}
        for mode, user in users.items():
            client = Client()
            client.force_login(user)
            value = client.cookies[settings.SESSION_COOKIE_NAME].value
            cookies[mode] = {"name": settings.SESSION_COOKIE_NAME, "value": value}
        print(f"Slide {slide.name}: {slide.width}x{slide.height}, {n_tasks} patches queued; {os.cpu_count()} CPUs\n")
        with asgi_server(env, log) as port, sync_playwright() as playwright:
            base = f"http://127.0.0.1:{port}"
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            # Warm the server's code paths (imports, slide open) outside the measurement.
            annotate(browser, base, cookies["on"], project.pk, ahead=True, votes=0, think=0)
            runs = {}
            for mode, ahead in (("off", False), ("on", True)):
                runs[mode] = annotate(
                    browser, base, cookies[mode], project.pk, ahead=ahead, votes=args.votes, think=args.think
                )
            print("Annotator: keypress → next patch painted")
            for mode, label in (("off", "without lease ahead (baseline)"), ("on", "with lease ahead")):
                rows = runs[mode]
                print(describe(label, [r["latency"] for r in rows]))
                print(describe("  of which: vote request", [r["vote"] for r in rows]))
                print(describe("  of which: next-task request", [r["next"] for r in rows]))
                print(describe("  of which: images loaded + painted", [r["images"] for r in rows]))
            medians = {mode: statistics.median(r["latency"] for r in rows) for mode, rows in runs.items()}
            print(f"{'baseline / lease ahead, medians':<44} {medians['off'] / medians['on']:7.1f}x")
            opens = [open_viewer(browser, base, cookies["on"], project.pk, slide.pk) for _ in range(args.opens)]
            browser.close()
        print("\nViewer: navigation start → first field of view fully drawn (fresh browser context each)")
        print(f"{'first open (cold server caches)':<44} {opens[0]['ms']:7.1f} ms, {opens[0]['tiles']} tiles")
        if len(opens) > 1:
            print(describe("later opens", [o["ms"] for o in opens[1:]]))
    finally:
        # Votes protect their labels and annotators, so they go first.
        Vote.objects.filter(project=project).delete()
        project.delete()
        get_user_model().objects.filter(pk__in=[u.pk for u in users.values()]).delete()
        shutil.rmtree(media, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
