"""The lean tile route (annotations.slides.lean) in front of Django, driven as the ASGI server drives it.

Django's ASGI handler runs each request's database work in a thread of its own, which cannot see a
test's uncommitted transaction; so these tests commit (``transactional_db``) and build their slide
per test.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.asgi import get_asgi_application
from rest_framework.authtoken.models import Token

from annotations.models import Membership, Role
from annotations.slides import access, lean, tiles
from tests.asgi_client import asgi_request, session_cookie
from tests.factories import ProjectFactory, UserFactory, member

from .test_slides_support import FAST_HASHERS, TCGA, ingest_file, shared_slide

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def world(tmp_path, settings) -> Iterator[SimpleNamespace]:  # type: ignore[no-untyped-def]
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.PASSWORD_HASHERS = FAST_HASHERS
    access.access_cache.clear()
    tiles.shared_cache.clear()
    project = ProjectFactory(patch_size=224, magnification=20.0)
    slide = ingest_file(project, shared_slide(TCGA))
    yield SimpleNamespace(project=project, slide=slide, viewer=member(project, Role.CROWD), outsider=UserFactory())
    access.access_cache.clear()


class Counting:
    """The Django ASGI app, counting the requests that reach it."""

    def __init__(self) -> None:
        self.app = get_asgi_application()
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture
def route() -> tuple[lean.LeanTiles, Counting]:
    inner = Counting()
    return lean.LeanTiles(inner), inner


def asgi_get(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET", host: bytes = b"testserver"
) -> dict[str, Any]:
    status, sent, body = asgi_request(app, method, path, headers, host=host)
    names = {name.lower(): value for name, value in sent}  # names are case-insensitive
    return {"status": status, "headers": names, "body": body}


def session_of(user: Any) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"other=1; {session_cookie(user)}".encode())]


def tile_url(world: SimpleNamespace, tile: str = "5/3/3") -> str:
    return f"/api/v1/slides/{world.slide.pk}/tiles/{tile}.jpeg"


def test_a_credential_django_authorised_is_served_without_django(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    cookie = session_of(world.viewer)
    first = asgi_get(app, tile_url(world), cookie)
    assert first["status"] == 200 and inner.calls == 1  # Django authenticated and authorised
    again = asgi_get(app, tile_url(world), cookie)
    assert again["status"] == 200 and inner.calls == 1  # answered in front of Django
    assert again["body"] == first["body"]
    assert again["headers"][b"etag"] == first["headers"][b"etag"]
    assert again["headers"][b"content-type"] == b"image/jpeg"
    assert again["headers"][b"content-length"] == str(len(first["body"])).encode()
    # The headers Django's middleware adds are there too, with the same values.
    for name in (b"cache-control", b"x-content-type-options", b"referrer-policy", b"cross-origin-opener-policy"):
        assert again["headers"][name] == first["headers"][name], name
    assert again["headers"][b"x-frame-options"] == first["headers"][b"x-frame-options"]

    unchanged = asgi_get(app, tile_url(world), [*cookie, (b"if-none-match", first["headers"][b"etag"])])
    assert unchanged["status"] == 304 and unchanged["body"] == b"" and inner.calls == 1
    assert unchanged["headers"][b"etag"] == first["headers"][b"etag"]
    other_tag = asgi_get(app, tile_url(world), [*cookie, (b"if-none-match", b'"something-else"')])
    assert other_tag["status"] == 200 and inner.calls == 1
    missing = asgi_get(app, tile_url(world, "5/99/0"), cookie)
    assert missing["status"] == 404 and b"no tile" in missing["body"] and inner.calls == 1


def test_an_api_token_is_served_by_the_lean_route_once_authorised(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    token = Token.objects.create(user=world.viewer)
    header = [(b"authorization", f"Token {token.key}".encode())]
    assert asgi_get(app, tile_url(world), header)["status"] == 200 and inner.calls == 1
    assert asgi_get(app, tile_url(world), header)["status"] == 200 and inner.calls == 1
    token.delete()


def test_outsiders_and_strangers_go_to_django_every_time(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    outsider = session_of(world.outsider)
    for expected_calls in (1, 2):
        response = asgi_get(app, tile_url(world), outsider)
        assert response["status"] == 404 and inner.calls == expected_calls
    assert asgi_get(app, tile_url(world), [])["status"] == 403 and inner.calls == 3
    assert asgi_get(app, tile_url(world), [(b"authorization", b"Token not-a-token")])["status"] == 403
    assert asgi_get(app, tile_url(world), [(b"cookie", b"sessionid=forged")])["status"] == 403
    assert inner.calls == 5
    # A member's credential does not open another slide id for the lean route.
    viewer = session_of(world.viewer)
    assert asgi_get(app, tile_url(world), viewer)["status"] == 200 and inner.calls == 6
    other = f"/api/v1/slides/{world.slide.pk + 1000}/tiles/5/3/3.jpeg"
    assert asgi_get(app, other, viewer)["status"] == 404 and inner.calls == 7


def test_a_removed_member_is_refused_once_the_access_cache_forgets_them(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    user = member(world.project, Role.CROWD)
    cookie = session_of(user)
    assert asgi_get(app, tile_url(world, "5/1/1"), cookie)["status"] == 200
    Membership.objects.filter(user=user).delete()
    access.access_cache.clear()  # what ACCESS_TTL_SECONDS does
    assert asgi_get(app, tile_url(world, "5/1/1"), cookie)["status"] == 404 and inner.calls == 2
    user.delete()


def test_other_methods_and_paths_go_to_django(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    cookie = session_of(world.viewer)
    assert asgi_get(app, tile_url(world), cookie)["status"] == 200 and inner.calls == 1
    assert asgi_get(app, tile_url(world), cookie, method="POST")["status"] in (403, 405) and inner.calls == 2
    thumbnail = asgi_get(app, f"/api/v1/slides/{world.slide.pk}/thumbnail.jpeg", cookie)
    assert thumbnail["status"] == 200 and inner.calls == 3
    head = asgi_get(app, tile_url(world), cookie, method="HEAD")
    assert head["status"] == 200 and head["body"] == b"" and inner.calls == 3


def test_unknown_hosts_and_plain_http_under_ssl_redirect_go_to_django(world, route, settings):  # type: ignore[no-untyped-def]
    app, inner = route
    cookie = session_of(world.viewer)
    assert asgi_get(app, tile_url(world), cookie)["status"] == 200 and inner.calls == 1
    assert asgi_get(app, tile_url(world), cookie, host=b"evil.example")["status"] == 400 and inner.calls == 2
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = False
    settings.SECURE_HSTS_PRELOAD = False
    # A new Django app: SecurityMiddleware reads the setting when it is built.
    redirecting = Counting()
    app = lean.LeanTiles(redirecting)
    assert asgi_get(app, tile_url(world), cookie)["status"] == 301 and redirecting.calls == 1
    secure = asgi_get(app, tile_url(world), [*cookie, (b"x-forwarded-proto", b"https")])
    assert secure["status"] == 200 and redirecting.calls == 1  # served in front of Django, with HSTS
    assert secure["headers"][b"strict-transport-security"] == b"max-age=3600"


def test_the_lean_tile_path_is_the_tile_route_djangos_urls_give() -> None:
    from django.urls import reverse

    url = reverse("slide-tile", kwargs={"slide_id": 7, "z": 1, "x": 2, "y": 3})
    match = lean.TILE_PATH.match(url)
    assert match is not None and match.groups() == ("7", "1", "2", "3")


def test_the_served_application_mounts_the_lean_route() -> None:
    from histoloop import asgi

    http = asgi.application.application_mapping["http"]
    # Inside the body limits (histoloop.body_limit), which wrap everything HTTP, and the lean queue route.
    chain = [http]
    while hasattr(chain[-1], "app"):
        chain.append(chain[-1].app)
    assert [type(app).__name__ for app in chain[:3]] == ["RequestBodyLimit", "LeanQueue", "LeanTiles"]
    assert isinstance(chain[2], lean.LeanTiles)


def test_the_lean_route_answers_from_the_shared_cache(world, route):  # type: ignore[no-untyped-def]
    app, inner = route
    cookie = session_of(world.viewer)
    assert asgi_get(app, tile_url(world, "5/2/2"), cookie)["status"] == 200 and inner.calls == 1
    # What another process put there (JPEG 2000 is rendered, so this slide's tiles live in the cache).
    tiles.shared_cache.set(tiles.cache_key(world.slide.checksum, 5, 6, 6), b"rendered elsewhere")
    served = asgi_get(app, tile_url(world, "5/6/6"), cookie)
    assert served["status"] == 200 and served["body"] == b"rendered elsewhere" and inner.calls == 1
