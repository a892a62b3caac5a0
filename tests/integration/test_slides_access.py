"""Who may see a slide's pixels: members only, through a session or an API token, for as long as the
credentials cache remembers them; no images for a failed slide."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from annotations.models import Membership, Role
from annotations.slides import access, ingest
from tests.factories import ProjectFactory, member

from . import test_slides_support as support
from .test_slides_support import jpeg, shared_slide

pytestmark = pytest.mark.django_db

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media
world, project, tcga, viewer = support.world, support.project, support.tcga, support.viewer


def test_only_members_of_the_slides_project_see_its_images(tcga, project):  # type: ignore[no-untyped-def]
    urls = [
        f"/api/v1/slides/{tcga.pk}/tiles/0/0/0.jpeg",
        f"/api/v1/slides/{tcga.pk}/thumbnail.jpeg",
        f"/api/v1/slides/{tcga.pk}/region.jpeg?left=0&top=0&width=100&height=100",
        f"/api/v1/slides/{tcga.pk}/tilesource",
        f"/api/v1/patches/{tcga.patches.first().pk}/image.jpeg",
    ]
    outsider = Client()
    outsider.force_login(member(ProjectFactory(), Role.ADMIN))
    anonymous = Client()
    for url in urls:
        assert outsider.get(url).status_code == 404, url
        assert anonymous.get(url).status_code in (401, 403), url
    assert outsider.get("/api/v1/slides/987654321/tiles/0/0/0.jpeg").status_code == 404


def test_a_removed_member_loses_access_once_the_cache_entry_expires(tcga, project):  # type: ignore[no-untyped-def]
    user = member(project, Role.CROWD)
    client = Client()
    client.force_login(user)
    url = f"/api/v1/slides/{tcga.pk}/tiles/0/0/0.jpeg"
    assert client.get(url).status_code == 200
    Membership.objects.filter(user=user).delete()
    access.access_cache.clear()  # what ACCESS_TTL_SECONDS does on its own
    assert client.get(url).status_code == 404


def test_an_api_token_works_for_tiles(tcga, project):  # type: ignore[no-untyped-def]
    token = Token.objects.create(user=member(project, Role.EXPERT))
    client = Client(HTTP_AUTHORIZATION=f"Token {token.key}")
    jpeg(client.get(f"/api/v1/slides/{tcga.pk}/tiles/1/0/0.jpeg"))
    wrong = Client(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert wrong.get(f"/api/v1/slides/{tcga.pk}/tiles/1/0/0.jpeg").status_code == 403


def test_a_failed_slide_has_no_images(media, project, viewer):  # type: ignore[no-untyped-def]
    slide = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    ingest.fail_slide(slide, "Broken on purpose.")
    assert viewer.get(f"/api/v1/slides/{slide.pk}/tiles/0/0/0.jpeg").status_code == 404
    assert viewer.get(f"/api/v1/slides/{slide.pk}/tilesource").status_code == 404


def test_the_credentials_cache_forgets_an_entry_after_its_ttl_and_keeps_the_newest_entries(monkeypatch):  # type: ignore[no-untyped-def]
    now = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: now[0])
    cache = access._AccessCache(ttl=30.0, size=2)
    cache.put(("a", "slide", 1), "first")
    now[0] += 29.0
    assert cache.get(("a", "slide", 1)) == "first"
    now[0] += 2.0
    assert cache.get(("a", "slide", 1)) is None
    for number in (2, 3, 4):
        cache.put(("a", "slide", number), number)
    assert cache.get(("a", "slide", 2)) is None
    assert [cache.get(("a", "slide", n)) for n in (3, 4)] == [3, 4]
