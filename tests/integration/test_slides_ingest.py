"""The ingest service on real slides: metadata, thumbnails, patch grids, bad input, idempotence."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from annotations.models import Patch, Slide
from annotations.slides import ingest, tasks
from tests.conftest import LC25000_DIR
from tests.factories import ProjectFactory

from . import test_slides_support as support
from .test_slides_support import CMU, TCGA, assert_no_stray_media, ingest_file, media_files, shared_slide

pytestmark = pytest.mark.django_db

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    return ProjectFactory(patch_size=224, magnification=20.0)


# name, width, height, magnification, mpp, minimum patches, maximum patches, words in the message
FIXTURES = [
    (CMU, 2220, 2967, 20.0, 0.499, 30, 80, None),
    (TCGA, 4443, 3567, None, None, 100, 300, "no magnification"),
    ("kidney-48-5.tif", 1493, 901, None, None, 0, 3, "No tissue found"),
    ("small_vectra.qptiff", 1920, 1440, 20.14, 0.4965, 0, 48, "fluorescence"),
    ("small_HE_levels.tiff", 300, 250, None, None, 0, 1, "no magnification"),
    ("boxes.tiff", 300, 250, None, None, 0, 1, "no magnification"),
    ("small.svs", 16, 16, 20.0, 0.499, 0, 1, None),
    ("boxes_0.dcm", 16, 16, 20.0, 0.499, 0, 1, None),
]


def test_it_explains_that_a_dicom_file_without_the_pyramid_cannot_stand_alone(media, project):  # type: ignore[no-untyped-def]
    # boxes_1.dcm is the second file of a DICOM-WSI pair; OpenSlide finds no pyramid in it alone.
    with pytest.raises(ingest.SlideRejected) as caught:
        ingest.add_slide_from_path(project, shared_slide("boxes_1.dcm"))
    assert caught.value.code == "unreadable"
    assert "a DICOM file must hold the whole-slide image pyramid" in caught.value.message
    assert Slide.objects.count() == 0
    assert media_files() == set()


@pytest.mark.parametrize(("name", "width", "height", "mag", "mpp", "low", "high", "note"), FIXTURES)
def test_it_ingests_each_format_with_metadata_thumbnail_and_grid(
    media, project, name, width, height, mag, mpp, low, high, note
):  # type: ignore[no-untyped-def]
    path = shared_slide(name)
    slide = ingest_file(project, path)

    assert slide.status == Slide.Status.READY, slide.error
    assert (slide.width, slide.height) == (width, height)
    assert slide.levels and slide.levels >= 1
    assert slide.magnification == (pytest.approx(mag, abs=0.01) if mag else None)
    assert slide.mpp == (pytest.approx(mpp, abs=0.001) if mpp else None)
    assert slide.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert slide.size_bytes == path.stat().st_size
    thumbnail = Image.open(io.BytesIO((media / slide.thumbnail.name).read_bytes()))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 512
    assert low <= slide.patches.count() <= high
    if note:
        assert note in slide.message
    if slide.patches.count() == 0:
        assert "No tissue found" in slide.message
    extent = 224 * (mag or 20.0) / 20.0 if mag else 224
    for patch in slide.patches.all():
        assert patch.size == round(extent)
        assert patch.magnification == 20.0
        assert 0.25 <= patch.tissue_fraction <= 1.0
        assert patch.x + patch.size <= max(width, patch.size) and patch.y + patch.size <= max(height, patch.size)
    assert_no_stray_media()


def test_it_gives_a_patch_sized_tissue_jpeg_exactly_one_patch(media, project, tmp_path):  # type: ignore[no-untyped-def]
    source = LC25000_DIR / "lung_image_sets" / "lung_aca" / "lungaca1.jpeg"
    if not source.exists():
        pytest.skip(f"Shared test data is missing: {source}.")
    slide = ingest_file(project, source)
    assert slide.status == Slide.Status.READY
    assert (slide.width, slide.height) == (224, 224)
    patches = list(slide.patches.all())
    assert len(patches) == 1
    assert (patches[0].x, patches[0].y, patches[0].size) == (0, 0, 224)
    assert patches[0].tissue_fraction > 0.9


def test_it_reads_png_images(media, project, tmp_path):  # type: ignore[no-untyped-def]
    from skimage import data

    path = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(path)
    slide = ingest_file(project, path)
    assert slide.status == Slide.Status.READY
    assert (slide.width, slide.height) == (512, 512)
    assert slide.format == "png"
    assert slide.patches.count() >= 1


def test_re_running_the_task_replaces_rather_than_duplicates(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(CMU))
    first = sorted(slide.patches.values_list("id", "x", "y", "tissue_fraction"))
    files_before = media_files()

    assert tasks.ingest_slide(slide.pk) == "ready"

    assert sorted(slide.patches.values_list("id", "x", "y", "tissue_fraction")) == first
    assert media_files() == files_before
    assert Slide.objects.count() == 1


def test_re_running_after_a_patch_size_change_rebuilds_the_grid(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide(CMU))
    before = slide.patches.count()
    project.patch_size = 448
    project.save()

    ingest.ingest(slide.pk)

    sizes = set(slide.patches.values_list("size", flat=True))
    assert sizes == {448}
    assert 0 < slide.patches.count() < before


def test_it_records_the_slide_in_its_own_directory(media, project):  # type: ignore[no-untyped-def]
    slide = ingest_file(project, shared_slide("small.svs"))
    # The ids for people, a uuid4 hex so that no other database on this MEDIA_ROOT names the same path.
    assert re.fullmatch(rf"slides/{project.pk}/{slide.pk}-[0-9a-f]{{32}}/small\.svs", slide.file.name)
    assert re.fullmatch(rf"thumbnails/{project.pk}/{slide.pk}-[0-9a-f]{{32}}\.jpeg", slide.thumbnail.name)
    assert media_files() == {slide.file.name, slide.thumbnail.name}


# Bad input through the service (the CLI and the API use the same calls).


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda d: _write(d / "cut.svs", shared_slide(CMU).read_bytes()[:100_000]), "unreadable", "could not be read"),
        (
            lambda d: _write(d / "cut.tif", shared_slide("kidney-48-5.tif").read_bytes()[:100_000]),
            "truncated",
            "truncated",
        ),
        (lambda d: _write(d / "notes.svs", b"These are my notes, not a slide.\n" * 20), "unreadable", "not an image"),
        (lambda d: _write(d / "notes.txt", b"hello"), "unsupported", "not a supported slide format"),
        (lambda d: _write(d / "slide", b"hello"), "unsupported", "no extension"),
        (lambda d: _write(d / "empty.svs", b""), "empty", "is empty"),
        (lambda d: _write(d / "fake.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), "unreadable", "could not be read"),
    ],
)
def test_it_refuses_bad_files_with_a_sentence_and_keeps_nothing(media, project, tmp_path, make, code, words):  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(ingest.SlideRejected) as caught:
        ingest.add_slide_from_path(project, path)
    assert caught.value.code == code
    assert words in caught.value.message
    assert caught.value.message.endswith(".")
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_it_refuses_a_file_over_the_size_limit(media, project, settings):  # type: ignore[no-untyped-def]
    settings.MAX_UPLOAD_BYTES = 1000
    with pytest.raises(ingest.SlideRejected) as caught:
        ingest.add_slide_from_path(project, shared_slide("small_vectra.qptiff"))
    assert caught.value.status == 413
    assert "larger than the 1000 bytes limit" in caught.value.message
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_it_stops_streaming_once_the_limit_is_passed(media, project, settings):  # type: ignore[no-untyped-def]
    settings.MAX_UPLOAD_BYTES = 10_000
    incoming = ingest.IncomingFile("big.svs")
    with pytest.raises(ingest.SlideRejected):
        incoming.write_all(iter([b"x" * 6000, b"x" * 6000, b"never read"]))
    assert not incoming.path.exists()
    assert media_files() == set()


def test_it_refuses_the_same_file_twice_naming_the_existing_slide(media, project):  # type: ignore[no-untyped-def]
    first = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    with pytest.raises(ingest.SlideRejected) as caught:
        ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    assert caught.value.status == 409
    assert f"already in this project as slide 'small.svs' (id {first.pk})" in caught.value.message
    assert Slide.objects.count() == 1
    assert_no_stray_media()


def test_the_same_file_may_go_into_another_project_or_again_after_a_failure(media, project):  # type: ignore[no-untyped-def]
    first = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    ingest.add_slide_from_path(ProjectFactory(), shared_slide("small.svs"), launch=False)
    ingest.fail_slide(first, "Broken on purpose.")
    again = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    assert again.pk != first.pk
    assert_no_stray_media()


def test_a_slide_that_breaks_during_processing_ends_failed_and_leaves_nothing(media, project):  # type: ignore[no-untyped-def]
    slide = ingest.add_slide_from_path(project, shared_slide(CMU), launch=False)
    Path(slide.file.path).write_bytes(b"overwritten by a disk fault")

    assert tasks.ingest_slide(slide.pk) == "failed"

    slide.refresh_from_db()
    assert slide.status == Slide.Status.FAILED
    assert "could not be read as a slide" in slide.error
    assert not slide.file and not slide.thumbnail
    assert Patch.objects.filter(slide=slide).count() == 0
    assert media_files() == set()
    assert tasks.ingest_slide(slide.pk) == "failed"  # re-running a failed slide changes nothing


def test_a_slide_whose_file_vanished_fails_with_a_reason(media, project):  # type: ignore[no-untyped-def]
    slide = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    shutil.rmtree(Path(slide.file.path).parent)
    ingest.ingest(slide.pk)
    slide.refresh_from_db()
    assert slide.status == Slide.Status.FAILED
    assert "missing from storage" in slide.error


def test_adding_a_slide_queues_the_ingest_after_commit(media, project, django_capture_on_commit_callbacks, monkeypatch):  # type: ignore[no-untyped-def]
    queued: list[int] = []
    monkeypatch.setattr(tasks.ingest_slide, "delay", queued.append)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        slide = ingest.add_slide_from_path(project, shared_slide("small.svs"))
    assert queued == []
    assert len(callbacks) == 1
    callbacks[0]()
    assert queued == [slide.pk]


def test_a_broker_outage_fails_the_slide_with_a_reason(media, project, monkeypatch):  # type: ignore[no-untyped-def]
    def unavailable(slide_id: int) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(tasks.ingest_slide, "delay", unavailable)
    slide = ingest.add_slide_from_path(project, shared_slide("small.svs"), launch=False)
    ingest.queue_ingest(slide.pk)
    slide.refresh_from_db()
    assert slide.status == Slide.Status.FAILED
    assert "could not be queued" in slide.error
    assert media_files() == set()
