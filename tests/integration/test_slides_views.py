"""Adding and listing slides over REST and through the browser upload page (the image endpoints are
tested with their pixels in test_slides_tiles.py, and for who may see them in test_slides_access.py)."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from annotations.models import Role, Slide
from annotations.slides import ingest
from tests.factories import ProjectFactory, member

from . import test_slides_support as support
from .test_slides_support import CMU, assert_no_stray_media, media_files, shared_slide

pytestmark = pytest.mark.django_db

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    return ProjectFactory()


@pytest.fixture
def admin(project):  # type: ignore[no-untyped-def]
    client = APIClient()
    client.force_authenticate(member(project, Role.ADMIN))
    return client


def upload(client, project, name: str, content: bytes, **extra):  # type: ignore[no-untyped-def]
    return client.post(
        f"/api/v1/projects/{project.pk}/slides/",
        {"file": SimpleUploadedFile(name, content), **extra},
        format="multipart",
    )


def test_an_admin_adds_a_slide_and_its_ingest_is_queued_after_commit(
    media, project, admin, django_capture_on_commit_callbacks, monkeypatch
):  # type: ignore[no-untyped-def]
    from annotations.slides import tasks

    queued: list[int] = []
    monkeypatch.setattr(tasks.ingest_slide, "delay", queued.append)
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(admin, project, CMU, shared_slide(CMU).read_bytes(), group="case-7")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "processing"
    assert (body["width"], body["height"], body["magnification"]) == (2220, 2967, 20.0)
    assert body["group"] == "case-7"
    assert queued == [body["id"]]

    assert tasks.ingest_slide(body["id"]) == "ready"
    detail = admin.get(f"/api/v1/slides/{body['id']}/").json()
    assert detail["status"] == "ready"
    assert detail["patch_count"] > 0
    assert detail["thumbnail_url"] == f"/api/v1/slides/{body['id']}/thumbnail.jpeg"
    assert detail["tilesource_url"] == f"/api/v1/slides/{body['id']}/tilesource"
    assert_no_stray_media()


@pytest.mark.parametrize(
    ("name", "content", "status", "words"),
    [
        ("notes.txt", b"hello", 400, "not a supported slide format (.txt)"),
        ("notes.svs", b"plain text renamed to look like a slide\n" * 10, 400, "could not be read as a slide"),
        ("cut.svs", None, 400, "could not be read as a slide"),
        ("empty.tif", b"", 400, "is empty"),
    ],
)
def test_it_refuses_bad_uploads_with_a_sentence_and_keeps_nothing(media, project, admin, name, content, status, words):  # type: ignore[no-untyped-def]
    if content is None:
        content = shared_slide(CMU).read_bytes()[:100_000]
    response = upload(admin, project, name, content)
    assert response.status_code == status
    assert words in response.json()["detail"]
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_it_refuses_a_truncated_pyramid_tiff(media, project, admin):  # type: ignore[no-untyped-def]
    response = upload(admin, project, "kidney.tif", shared_slide("kidney-48-5.tif").read_bytes()[:100_000])
    assert response.status_code == 400
    assert "is truncated" in response.json()["detail"]
    assert media_files() == set()


@pytest.mark.parametrize("limit", [100_000, 1_500_000])  # refused from Content-Length / while streaming
def test_it_answers_413_for_a_file_over_the_limit_and_keeps_nothing(media, project, admin, settings, limit):  # type: ignore[no-untyped-def]
    settings.MAX_UPLOAD_BYTES = limit
    response = upload(admin, project, CMU, shared_slide(CMU).read_bytes())  # 1.9 MB
    assert response.status_code == 413
    assert "larger than the" in response.json()["detail"]
    assert "limit for slides" in response.json()["detail"]
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_it_refuses_the_same_file_twice_with_409_naming_the_slide(media, project, admin):  # type: ignore[no-untyped-def]
    content = shared_slide("small.svs").read_bytes()
    first = upload(admin, project, "small.svs", content).json()
    response = upload(admin, project, "renamed.svs", content)
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"'renamed.svs' is already in this project as slide 'small.svs' (id {first['id']}); it was not added again."
    )
    assert Slide.objects.count() == 1
    assert_no_stray_media()


def test_it_asks_for_a_file_when_none_was_sent(media, project, admin):  # type: ignore[no-untyped-def]
    response = admin.post(f"/api/v1/projects/{project.pk}/slides/", {"group": "x"}, format="multipart")
    assert response.status_code == 400
    assert response.json()["detail"] == "Choose a slide file to upload (form field 'file')."


def test_only_project_admins_may_add_slides(media, project):  # type: ignore[no-untyped-def]
    content = shared_slide("small.svs").read_bytes()
    crowd = APIClient()
    crowd.force_authenticate(member(project, Role.CROWD))
    assert upload(crowd, project, "small.svs", content).status_code == 403
    outsider = APIClient()
    outsider.force_authenticate(member(ProjectFactory(), Role.ADMIN))
    assert upload(outsider, project, "small.svs", content).status_code == 404
    assert upload(APIClient(), project, "small.svs", content).status_code in (401, 403)
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_members_list_slides_in_a_constant_number_of_queries(media, project, admin, django_assert_max_num_queries):  # type: ignore[no-untyped-def]
    for name in ("small.svs", "boxes_0.dcm", "small_HE_levels.tiff"):
        ingest.ingest(ingest.add_slide_from_path(project, shared_slide(name), launch=False).pk)
    crowd = APIClient()
    crowd.force_authenticate(member(project, Role.CROWD))
    with django_assert_max_num_queries(4):
        response = crowd.get(f"/api/v1/projects/{project.pk}/slides/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [s["name"] for s in body["results"]] == ["small.svs", "boxes_0.dcm", "small_HE_levels.tiff"]
    outsider = APIClient()
    outsider.force_authenticate(member(ProjectFactory(), Role.ADMIN))
    assert outsider.get(f"/api/v1/projects/{project.pk}/slides/").status_code == 404
    first = body["results"][0]["id"]
    assert outsider.get(f"/api/v1/slides/{first}/").status_code == 404


# The browser upload page.


def test_the_upload_page_shows_a_form_to_admins(media, project):  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(member(project, Role.ADMIN))
    response = client.get(f"/projects/{project.pk}/slides/upload/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="file"' in html and "csrfmiddlewaretoken" in html
    assert f"/api/v1/projects/{project.pk}/slides/" in html


def test_the_upload_page_adds_a_slide_without_javascript(media, project, settings):  # type: ignore[no-untyped-def]
    client = Client(enforce_csrf_checks=True)
    client.force_login(member(project, Role.ADMIN))
    page = client.get(f"/projects/{project.pk}/slides/upload/")
    token = page.cookies[settings.CSRF_COOKIE_NAME].value
    content = shared_slide("small.svs").read_bytes()
    response = client.post(
        f"/projects/{project.pk}/slides/upload/",
        {"file": SimpleUploadedFile("small.svs", content), "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 201
    assert "Added small.svs as slide" in response.content.decode()
    again = client.post(
        f"/projects/{project.pk}/slides/upload/",
        {"file": SimpleUploadedFile("again.svs", content), "csrfmiddlewaretoken": token},
    )
    assert again.status_code == 409
    assert "is already in this project as slide" in again.content.decode()
    assert Slide.objects.count() == 1
    assert_no_stray_media()


def test_the_upload_page_refuses_bad_files_and_oversized_ones(media, project, settings):  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(member(project, Role.ADMIN))
    url = f"/projects/{project.pk}/slides/upload/"
    response = client.post(url, {"file": SimpleUploadedFile("notes.svs", b"not a slide at all")})
    assert response.status_code == 400
    assert "could not be read as a slide" in response.content.decode()
    settings.MAX_UPLOAD_BYTES = 1000
    response = client.post(url, {"file": SimpleUploadedFile("small.svs", b"x" * 5000)})
    assert response.status_code == 413
    assert "limit for slides" in response.content.decode()
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_the_upload_page_is_for_project_admins_only(media, project):  # type: ignore[no-untyped-def]
    url = f"/projects/{project.pk}/slides/upload/"
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/accounts/login/" in anonymous["Location"]
    crowd = Client()
    crowd.force_login(member(project, Role.CROWD))
    assert crowd.get(url).status_code == 403
    outsider = Client()
    outsider.force_login(member(ProjectFactory(), Role.ADMIN))
    assert outsider.get(url).status_code == 404
