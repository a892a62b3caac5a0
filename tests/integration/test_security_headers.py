"""Security headers and the settings behind them: CSP on every page, DEBUG off unless asked for,
HTTPS-only cookies and HSTS when served over HTTPS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from annotations.models import Role
from tests.factories import MembershipFactory, ProjectFactory, UserFactory

ROOT = Path(__file__).resolve().parents[2]
REAL_KEY = "k3y-" + "x9Qz" * 16


def settings_in_a_fresh_process(**env: str) -> dict[str, object]:
    """Security settings as a server started with ``env`` (and no DEBUG unless given) would have them."""
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "HTTPS", "DJANGO_SETTINGS_MODULE"}}
    code = (
        "import json; from django.conf import settings as s; print(json.dumps({**{k: getattr(s, k) for k in "
        "['DEBUG', 'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_HSTS_SECONDS']}, "
        "'renderers': s.REST_FRAMEWORK['DEFAULT_RENDERER_CLASSES']}))"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_debug_is_off_unless_asked_for_and_https_settings_follow() -> None:
    assert settings_in_a_fresh_process(SECRET_KEY=REAL_KEY) == {
        "DEBUG": False,
        "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "renderers": ["rest_framework.renderers.JSONRenderer"],  # no browsable API in production
    }


def test_https_0_serves_plain_http_without_secure_cookies_or_hsts() -> None:
    values = settings_in_a_fresh_process(SECRET_KEY=REAL_KEY, HTTPS="0")
    assert values["DEBUG"] is False
    assert not values["SECURE_SSL_REDIRECT"] and not values["SESSION_COOKIE_SECURE"]
    assert values["SECURE_HSTS_SECONDS"] == 0


def test_debug_1_is_a_developer_machine() -> None:
    values = settings_in_a_fresh_process(DEBUG="1")
    assert values["DEBUG"] is True and values["SESSION_COOKIE_SECURE"] is False
    assert "rest_framework.renderers.BrowsableAPIRenderer" in values["renderers"]  # type: ignore[operator]


def policy(response: object) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]  # type: ignore[index]
    return {part.split()[0]: part.split()[1:] for part in header.split("; ")}


@pytest.mark.django_db
def test_pages_get_a_policy_without_inline_script_or_style() -> None:
    response = Client().get("/accounts/login/")
    assert response.status_code == 200
    directives = policy(response)
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["object-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"


@pytest.mark.django_db
def test_the_map_page_runs_without_unsafe_eval() -> None:
    """The map draws with plain WebGL (static/frontend/scatter.js): no script compiled at run time."""
    project = ProjectFactory()
    expert = UserFactory()
    MembershipFactory(project=project, user=expert, role=Role.EXPERT)
    client = Client()
    client.force_login(expert)
    response = client.get(f"/projects/{project.pk}/map/")
    assert response.status_code == 200
    assert policy(response)["script-src"] == ["'self'"]


@pytest.mark.django_db
def test_no_template_has_an_inline_script_or_style_without_the_nonce() -> None:
    """Inline <script>/<style> blocks need the response's nonce, style="" attributes are refused
    outright, so the templates must have neither unnonced blocks nor style attributes."""
    templates = [*ROOT.glob("frontend/templates/**/*.html"), *ROOT.glob("annotations/templates/**/*.html")]
    assert templates
    for template in templates:
        text = template.read_text()
        assert not re.search(r"\sstyle=", text), f"{template} has a style attribute"
        for tag in re.findall(r"<(?:script|style)\b[^>]*>", text):
            assert "src=" in tag or 'nonce="{{ request.csp_nonce }}"' in tag, (template, tag)


@pytest.mark.django_db
def test_the_upload_page_inline_blocks_carry_the_nonce_of_the_policy() -> None:
    admin = UserFactory()
    project = ProjectFactory()
    MembershipFactory(user=admin, project=project, role=Role.ADMIN)
    client = Client()
    client.force_login(admin)
    response = client.get(f"/projects/{project.pk}/slides/upload/")
    assert response.status_code == 200
    nonce = [v for v in policy(response)["script-src"] if v.startswith("'nonce-")]
    assert len(nonce) == 1
    value = nonce[0][len("'nonce-") : -1]
    html = response.content.decode()
    assert f'<script nonce="{value}">' in html
    assert f'<style nonce="{value}">' in html
    assert f"'nonce-{value}'" in policy(response)["style-src"]


@pytest.mark.django_db
def test_the_api_docs_page_may_load_the_swagger_bundle_but_no_inline_script() -> None:
    client = Client()
    client.force_login(UserFactory())
    response = client.get("/api/v1/docs/")
    assert response.status_code == 200
    directives = policy(response)
    assert "https://cdn.jsdelivr.net" in directives["script-src"]
    assert "'unsafe-inline'" not in directives["script-src"]
    assert b"<script>" not in response.content
