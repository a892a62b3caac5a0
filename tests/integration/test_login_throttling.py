"""Login throttling (django-axes): five failures in a row lock one username from one address."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.authtoken.models import Token

from tests.factories import UserFactory

PASSWORD = "pw-histoloop-1"  # tests.factories.UserFactory's password
LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"

pytestmark = pytest.mark.django_db


def attempt(path: str, username: str, password: str, address: str = "10.0.0.1") -> Any:
    return Client(REMOTE_ADDR=address).post(path, {"username": username, "password": password})


def logged_in(response: Any) -> bool:
    return response.status_code == 302 and settings.SESSION_COOKIE_NAME in response.cookies


def fail_until_locked(path: str, username: str, address: str = "10.0.0.1") -> list[int]:
    return [attempt(path, username, "wrong-password", address).status_code for _ in range(settings.AXES_FAILURE_LIMIT)]


def test_the_policy_is_five_failures_and_fifteen_minutes_by_default() -> None:
    assert settings.AXES_FAILURE_LIMIT == 5
    assert settings.AXES_COOLOFF_TIME.total_seconds() == 15 * 60
    assert settings.AXES_LOCKOUT_PARAMETERS == [["username", "ip_address"]]


def test_after_five_wrong_passwords_even_the_right_one_is_refused_with_a_clear_page() -> None:
    user = UserFactory()
    statuses = fail_until_locked(LOGIN, user.username)
    assert statuses == [200, 200, 200, 200, 429]  # the form again four times, then the lockout page
    response = attempt(LOGIN, user.username, PASSWORD)
    assert response.status_code == 429
    assert not logged_in(response)
    text = response.content.decode()
    assert "Too many failed logins" in text
    assert f"failed {settings.AXES_FAILURE_LIMIT} times in a row, so it is locked for 15" in text
    assert user.username in text


def test_a_lockout_leaves_other_accounts_and_other_addresses_alone() -> None:
    locked, other = UserFactory(), UserFactory()
    fail_until_locked(LOGIN, locked.username, "10.0.0.1")
    assert logged_in(attempt(LOGIN, other.username, PASSWORD, "10.0.0.1"))
    assert logged_in(attempt(LOGIN, locked.username, PASSWORD, "10.0.0.2"))
    assert attempt(LOGIN, locked.username, PASSWORD, "10.0.0.1").status_code == 429


def test_a_successful_login_clears_the_count() -> None:
    user = UserFactory()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        attempt(LOGIN, user.username, "wrong-password")
    assert logged_in(attempt(LOGIN, user.username, PASSWORD))
    assert attempt(LOGIN, user.username, "wrong-password").status_code == 200  # counting from zero again


def test_the_admin_login_is_throttled_too() -> None:
    admin = UserFactory(is_staff=True, is_superuser=True)
    statuses = fail_until_locked(ADMIN_LOGIN, admin.username)
    assert statuses[-1] == 429
    response = attempt(ADMIN_LOGIN, admin.username, PASSWORD)
    assert response.status_code == 429
    assert "Too many failed logins" in response.content.decode()
    assert logged_in(attempt(ADMIN_LOGIN, admin.username, PASSWORD, "10.0.0.9"))


def test_token_authentication_is_not_throttled_by_a_locked_login() -> None:
    user = UserFactory()
    token = Token.objects.create(user=user)
    fail_until_locked(LOGIN, user.username, "127.0.0.1")
    response = Client().get("/api/v1/projects/", HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200


def test_a_login_without_a_request_is_not_throttled_and_still_works() -> None:
    """The test client's login() calls authenticate() without a request: no address to count for."""
    user = UserFactory()
    fail_until_locked(LOGIN, user.username, "127.0.0.1")
    assert not Client().login(username=user.username, password="wrong-password")
    assert Client().login(username=user.username, password=PASSWORD)
