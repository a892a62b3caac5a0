"""Media paths belong to one slide row: unique beyond this database, read from the row, and removed
only as far as the row owns them.

"Another database on the same MEDIA_ROOT" (the tests beside the demo, a restored backup beside a new
install) is simulated by files at the paths that install's slide with the same project and slide ids
would have: the id-only layout of earlier versions, and the tokened layout with another token.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.db import transaction
from django.test import Client
from PIL import Image

from annotations.models import Patch, Role, Slide
from annotations.slides import ingest
from tests.factories import ProjectFactory, copy_slide, member

from . import test_slides_support as support
from .test_slides_support import assert_no_stray_media, ingest_file, jpeg, media_files, shared_slide

pytestmark = pytest.mark.django_db

_fresh_access_cache = support._fresh_access_cache
media = support.media

SMALL = "small.svs"


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    return ProjectFactory(patch_size=224, magnification=20.0)


def other_install(root: Path, project_id: int, slide_id: int) -> set[str]:
    """Files another database's slide ``slide_id`` of project ``project_id`` may have in this MEDIA_ROOT."""
    token = "0123456789abcdef" * 2
    names = {
        f"slides/{project_id}/{slide_id}/{SMALL}",  # the id-only layout of earlier versions
        f"slides/{project_id}/{slide_id}/notes.txt",
        f"thumbnails/{project_id}/{slide_id}.jpeg",
        f"slides/{project_id}/{slide_id}-{token}/{SMALL}",  # the tokened layout, another token
        f"thumbnails/{project_id}/{slide_id}-{token}.jpeg",
    }
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"another install's file " + name.encode())
    return names


def solid_jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_paths_are_unique_across_repeated_adds_of_the_same_name(media, project):  # type: ignore[no-untyped-def]
    names: list[str] = []
    for _ in range(3):
        slide = ingest_file(project, shared_slide(SMALL))
        names += [slide.file.name, slide.thumbnail.name]
        ingest.fail_slide(slide, "Removed to add the same file again.")
    elsewhere = ingest_file(ProjectFactory(), shared_slide(SMALL))
    names += [elsewhere.file.name, elsewhere.thumbnail.name]

    assert len(set(names)) == len(names) == 8
    assert len({str(Path(name).parent) for name in names if name.startswith("slides/")}) == 4
    for name in names:
        assert re.search(r"/\d+-[0-9a-f]{32}(/|\.jpeg$)", name), name
    assert media_files() == {elsewhere.file.name, elsewhere.thumbnail.name}


def test_a_failed_slide_removes_exactly_its_own_files(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(SMALL))
    neighbour = ingest_file(project, shared_slide("boxes_0.dcm"))
    theirs = other_install(media, project.pk, slide.pk)
    own = {slide.file.name, slide.thumbnail.name}
    own_folder = media / Path(slide.file.name).parent
    before = media_files()

    ingest.fail_slide(slide, "Broken on purpose.")

    slide.refresh_from_db()
    assert slide.status == Slide.Status.FAILED and not slide.file and not slide.thumbnail
    assert not Patch.objects.filter(slide_id=slide.pk).exists()
    assert before - media_files() == own
    assert media_files() == theirs | {neighbour.file.name, neighbour.thumbnail.name}
    assert not own_folder.exists()


def test_a_slide_that_fails_in_processing_leaves_another_installs_files(media, project):  # type: ignore[no-untyped-def]
    # Ingest ends in fail_slide: before, its rmtree of slides/<project>/<slide>/ took the other install's files.
    slide = ingest.add_slide_from_path(project, shared_slide(SMALL), launch=False)
    theirs = other_install(media, project.pk, slide.pk)
    Path(slide.file.path).write_bytes(b"overwritten by a disk fault")

    assert ingest.ingest(slide.pk).status == Slide.Status.FAILED

    assert media_files() == theirs


def test_an_add_that_fails_after_storing_the_file_removes_only_that_file(media, project, monkeypatch):  # type: ignore[no-untyped-def]
    theirs: set[str] = set()

    def broken_on_commit(*args: object, **kwargs: object) -> None:
        # Runs inside add_slide's transaction, after the file was moved into its folder.
        row = Slide.objects.get()
        assert (media / row.file.name).is_file()
        theirs.update(other_install(media, project.pk, row.pk))
        raise RuntimeError("the database went away")

    monkeypatch.setattr(transaction, "on_commit", broken_on_commit)
    with pytest.raises(RuntimeError):
        ingest.add_slide_from_path(project, shared_slide(SMALL))

    assert Slide.objects.count() == 0
    assert len(theirs) == 5
    assert media_files() == theirs
    # The new slide's own folder went too; the other install's two folders stayed.
    assert {p.name for p in (media / "slides" / str(project.pk)).iterdir()} == {
        Path(name).parts[2] for name in theirs if name.startswith("slides/")
    }


def test_removing_a_clone_never_deletes_its_sources_files(media, project):  # type: ignore[no-untyped-def]
    source = ingest_file(project, shared_slide(SMALL))
    copy = copy_slide(source, ProjectFactory())
    shared = {source.file.name, source.thumbnail.name}

    ingest.fail_slide(copy, "The pool project is finished.")

    assert media_files() == shared
    source.refresh_from_db()
    assert source.status == Slide.Status.READY

    ingest.fail_slide(source, "Now the last row referring to the files goes.")
    assert media_files() == set()


def test_re_ingesting_a_clone_gives_it_its_own_thumbnail_and_leaves_the_sources(media, project):  # type: ignore[no-untyped-def]
    source = ingest_file(project, shared_slide(SMALL))
    marker = solid_jpeg("red")
    (media / source.thumbnail.name).write_bytes(marker)
    copy = copy_slide(source, ProjectFactory())

    copy = ingest.ingest(copy.pk)

    assert copy.status == Slide.Status.READY
    assert copy.file.name == source.file.name
    assert copy.thumbnail.name != source.thumbnail.name
    assert re.fullmatch(rf"thumbnails/{copy.project_id}/{copy.pk}-[0-9a-f]{{32}}\.jpeg", copy.thumbnail.name)
    assert (media / source.thumbnail.name).read_bytes() == marker
    assert_no_stray_media()


def test_a_thumbnail_request_reads_the_rows_stored_path(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(SMALL))
    (media / slide.thumbnail.name).write_bytes(solid_jpeg("red"))
    decoy = media / "thumbnails" / str(project.pk) / f"{slide.pk}.jpeg"  # the id-derived path of before
    decoy.write_bytes(solid_jpeg("blue"))
    client = Client()
    client.force_login(member(project, Role.CROWD))

    response = client.get(f"/api/v1/slides/{slide.pk}/thumbnail.jpeg")

    assert response.status_code == 200
    assert response.content == (media / slide.thumbnail.name).read_bytes()
    assert jpeg(response).getpixel((4, 4))[0] > 200  # red, not the decoy's blue


def test_a_clone_serves_the_thumbnail_its_row_stores(media, project):  # type: ignore[no-untyped-def]
    source = ingest_file(project, shared_slide(SMALL))
    marker = solid_jpeg("red")
    (media / source.thumbnail.name).write_bytes(marker)
    pool = ProjectFactory()
    copy = copy_slide(source, pool)
    client = Client()
    client.force_login(member(pool, Role.CROWD))

    response = client.get(f"/api/v1/slides/{copy.pk}/thumbnail.jpeg")

    assert response.status_code == 200
    assert response.content == marker


def old_layout_slide(media: Path, project) -> Slide:  # type: ignore[no-untyped-def]
    """A row stored by an earlier version: file and thumbnail at id-only paths, in a folder shared by name."""
    slide = ingest_file(project, shared_slide(SMALL))
    old_file = f"slides/{project.pk}/{slide.pk}/{SMALL}"
    old_thumbnail = f"thumbnails/{project.pk}/{slide.pk}.jpeg"
    (media / old_file).parent.mkdir(parents=True)
    (media / old_file).write_bytes((media / slide.file.name).read_bytes())
    (media / old_thumbnail).write_bytes(solid_jpeg("red"))
    Slide.objects.filter(pk=slide.pk).update(file=old_file, thumbnail=old_thumbnail)
    (media / slide.file.name).unlink()
    (media / slide.thumbnail.name).unlink()
    (media / slide.file.name).parent.rmdir()
    slide.refresh_from_db()
    return slide


def test_a_row_in_the_old_layout_still_serves_and_deletes_only_its_own_files(media, project):  # type: ignore[no-untyped-def]
    slide = old_layout_slide(media, project)
    beside = media / "slides" / str(project.pk) / str(slide.pk) / "notes.txt"  # another install's, same folder
    beside.write_bytes(b"not this row's")
    client = Client()
    client.force_login(member(project, Role.CROWD))

    thumbnail = client.get(f"/api/v1/slides/{slide.pk}/thumbnail.jpeg")
    assert thumbnail.status_code == 200 and thumbnail.content == solid_jpeg("red")
    jpeg(client.get(f"/api/v1/slides/{slide.pk}/tiles/0/0/0.jpeg"))

    ingest.fail_slide(slide, "Broken on purpose.")

    assert media_files() == {str(beside.relative_to(media))}


def test_re_ingesting_an_old_layout_row_moves_its_thumbnail_to_a_unique_path(media, project):  # type: ignore[no-untyped-def]
    slide = old_layout_slide(media, project)
    old_thumbnail = slide.thumbnail.name

    slide = ingest.ingest(slide.pk)

    assert slide.status == Slide.Status.READY
    assert re.fullmatch(rf"thumbnails/{project.pk}/{slide.pk}-[0-9a-f]{{32}}\.jpeg", slide.thumbnail.name)
    assert not (media / old_thumbnail).exists()
    assert media_files() == {slide.file.name, slide.thumbnail.name}


def test_deleting_a_project_releases_its_slides_files_on_commit(media, project, django_capture_on_commit_callbacks):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(SMALL))
    kept = ingest_file(project, shared_slide("boxes_0.dcm"))
    pool = ProjectFactory()
    copy_of_kept = copy_slide(kept, pool)
    theirs = other_install(media, project.pk, slide.pk)
    ours = {slide.file.name, slide.thumbnail.name}
    own_folder = media / Path(slide.file.name).parent
    everything = media_files()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        project.delete()
    assert media_files() == everything  # nothing goes before the delete is committed
    for callback in callbacks:
        callback()

    assert everything - media_files() == ours
    assert media_files() == theirs | {copy_of_kept.file.name, copy_of_kept.thumbnail.name}
    assert not own_folder.exists()

    with django_capture_on_commit_callbacks(execute=True):
        pool.delete()
    assert media_files() == theirs


def test_a_rolled_back_delete_keeps_the_files(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(SMALL))
    before = media_files()

    with pytest.raises(RuntimeError), transaction.atomic():
        Slide.objects.filter(pk=slide.pk).delete()
        raise RuntimeError("changed my mind")

    assert Slide.objects.filter(pk=slide.pk).exists()
    assert media_files() == before == {slide.file.name, slide.thumbnail.name}
