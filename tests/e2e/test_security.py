"""The Content-Security-Policy in a real browser: the pages it covers work without a violation
(the ``page`` fixture fails a test on any console error, which is how Chromium reports them),
and the login lockout page is what a person sees."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.models import Role

from .conftest import PASSWORD, login

pytestmark = pytest.mark.e2e


def csp(response: Any) -> str:
    return response.headers["content-security-policy"]


def test_the_label_colours_reach_the_page_under_the_policy(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project()
    make_member(seeded.project, Role.CROWD, username="e2e-csp-student")
    with committed():
        label = seeded.project.label_classes.order_by("order").first()
    login(page, "e2e-csp-student", next_path=f"/projects/{seeded.project.pk}/annotate/")
    button = page.locator(f'.label-button[data-label="{label.pk}"]')
    expect(button).to_be_visible()
    red, green, blue = (int(label.colour[i : i + 2], 16) for i in (1, 3, 5))
    expect(button).to_have_css("border-left-color", f"rgb({red}, {green}, {blue})")
    page.goto(f"/projects/{seeded.project.pk}/viewer/")
    swatch = page.locator("#label-legend .swatch").first
    expect(swatch).to_have_css("background-color", f"rgb({red}, {green}, {blue})")


def test_the_upload_page_script_runs_under_the_policy(page: Any, make_project: Any, make_member: Any) -> None:
    seeded = make_project(queue=False)
    make_member(seeded.project, Role.ADMIN, username="e2e-csp-admin")
    login(page, "e2e-csp-admin")
    response = page.goto(f"/projects/{seeded.project.pk}/slides/upload/")
    assert "script-src 'self' 'nonce-" in csp(response)
    # The inline script (nonce) handles the submit: a file over the limit is refused in the page.
    page.evaluate(
        """() => {
            const input = document.getElementById("file");
            const data = new DataTransfer();
            data.items.add(new File(["x"], "tiny.svs"));
            input.files = data.files;
        }"""
    )
    # Chromium logs the API's refusal of the one-byte "slide" as a failed load: expected here.
    page.problems.allow(lambda text, url: "status of 400" in text and "/slides/" in url)
    page.get_by_role("button", name="Upload").click()
    # Written by the script from the API's answer (without it, the form would post and reload the page).
    expect(page.locator("#progress-list p.error")).to_contain_text("tiny.svs: 'tiny.svs' could not be read as a slide")


def test_the_admin_site_works_under_the_policy(page: Any, make_member: Any, make_project: Any) -> None:
    seeded = make_project(queue=False)
    superuser = make_member(seeded.project, Role.ADMIN, username="e2e-csp-superuser", is_staff=True, is_superuser=True)
    response = page.goto("/admin/login/")
    assert "default-src 'self'" in csp(response)
    page.get_by_label("Username").fill("e2e-csp-superuser")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    page.goto("/admin/auth/user/")
    expect(page.locator("#result_list")).to_be_visible()
    page.goto(f"/admin/auth/user/{superuser.pk}/change/")
    expect(page.locator("#user_form")).to_be_visible()


def test_a_locked_out_login_shows_why_and_for_how_long(page: Any, make_project: Any, make_member: Any) -> None:
    seeded = make_project(queue=False)
    make_member(seeded.project, Role.CROWD, username="e2e-csp-locked")
    # Chromium logs the 429 of the lockout page as a failed resource load: expected here.
    page.problems.allow(lambda text, url: "status of 429" in text and "/accounts/login/" in url)
    for _ in range(5):
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill("e2e-csp-locked")
        page.get_by_label("Password").fill("not-the-password")
        page.get_by_role("button", name="Log in").click()
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("e2e-csp-locked")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#locked-out")).to_contain_text("failed 5 times in a row, so it is locked for 15 minutes")
    assert "/accounts/login/" in page.url
