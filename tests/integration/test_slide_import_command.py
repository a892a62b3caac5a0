"""``manage.py import_slides PROJECT DIR``."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from annotations.models import Slide
from annotations.slides import tasks
from tests.factories import ProjectFactory

from . import test_slides_support as support
from .test_slides_support import CMU, assert_no_stray_media, media_files, shared_slide

pytestmark = pytest.mark.django_db

# Fixtures shared with the other slide test modules.
_fresh_access_cache = support._fresh_access_cache
media = support.media


@pytest.fixture
def import_root(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path / "import"
    root.mkdir()
    settings.SLIDE_IMPORT_ROOT = root
    return root


@pytest.fixture
def project():  # type: ignore[no-untyped-def]
    return ProjectFactory(name="Lung pilot")


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("import_slides", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_it_imports_and_processes_a_directory_now(media, import_root, project):  # type: ignore[no-untyped-def]
    batch = import_root / "batch1"
    batch.mkdir()
    for name in (CMU, "small_HE_levels.tiff", "boxes_0.dcm"):
        shutil.copy(shared_slide(name), batch / name)

    out, err = run("Lung pilot", "batch1", "--now", "--group", "patient-1")

    assert err == ""
    assert "3 slide(s) added to 'Lung pilot', 0 file(s) refused." in out
    assert f"Added {CMU} as slide" in out
    rows = Slide.objects.filter(project=project)
    assert sorted(rows.values_list("name", "status", "group")) == [
        ("boxes_0.dcm", "ready", "patient-1"),
        (CMU, "ready", "patient-1"),
        ("small_HE_levels.tiff", "ready", "patient-1"),
    ]
    assert rows.get(name=CMU).patches.count() > 0
    assert_no_stray_media()


def test_it_queues_each_slide_by_default(media, import_root, project, django_capture_on_commit_callbacks, monkeypatch):  # type: ignore[no-untyped-def]
    queued: list[int] = []
    monkeypatch.setattr(tasks.ingest_slide, "delay", queued.append)
    shutil.copy(shared_slide("small.svs"), import_root / "small.svs")

    with django_capture_on_commit_callbacks(execute=True):
        out, _ = run(str(project.pk), str(import_root))  # by id, absolute path inside the root

    slide = Slide.objects.get()
    assert slide.status == Slide.Status.PROCESSING
    assert queued == [slide.pk]
    assert "queued for processing" in out


def test_it_reports_each_bad_file_and_fails_the_command(media, import_root, project):  # type: ignore[no-untyped-def]
    (import_root / "cut.svs").write_bytes(shared_slide(CMU).read_bytes()[:100_000])
    (import_root / "notes.svs").write_text("not a slide\n")
    (import_root / "readme.txt").write_text("hello\n")
    shutil.copy(shared_slide("small.svs"), import_root / "good.svs")

    out = io.StringIO()
    err = io.StringIO()
    with pytest.raises(CommandError, match=r"1 slide\(s\) added to 'Lung pilot', 3 file\(s\) refused\."):
        call_command("import_slides", "Lung pilot", ".", stdout=out, stderr=err)

    lines = err.getvalue().splitlines()
    assert (
        "Refused cut.svs: 'cut.svs' could not be read as a slide; it may be corrupt, truncated or not an image."
        in lines
    )
    assert any(line.startswith("Refused notes.svs: 'notes.svs' could not be read as a slide") for line in lines)
    assert any("Refused readme.txt: 'readme.txt' is not a supported slide format (.txt)" in line for line in lines)
    assert list(Slide.objects.values_list("name", flat=True)) == ["good.svs"]
    assert_no_stray_media()


def test_it_refuses_a_file_over_the_size_limit(media, import_root, project, settings):  # type: ignore[no-untyped-def]
    settings.MAX_UPLOAD_BYTES = 100_000
    shutil.copy(shared_slide(CMU), import_root / CMU)
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("import_slides", "Lung pilot", ".", stdout=io.StringIO(), stderr=err)
    assert "is larger than the 97.7 KB limit for slides; nothing was kept." in err.getvalue()
    assert Slide.objects.count() == 0
    assert media_files() == set()


@pytest.mark.parametrize("escape", ["../", "..", "batch/../../elsewhere", "/etc"])
def test_it_refuses_paths_outside_the_import_directory(media, import_root, project, escape):  # type: ignore[no-untyped-def]
    (import_root / "batch").mkdir()
    elsewhere = import_root.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(shared_slide("small.svs"), elsewhere / "small.svs")
    with pytest.raises(CommandError, match="is outside the import directory"):
        run("Lung pilot", escape)
    assert Slide.objects.count() == 0
    assert media_files() == set()


def test_it_refuses_a_symlink_that_escapes_the_import_directory(media, import_root, project, tmp_path):  # type: ignore[no-untyped-def]
    outside = tmp_path / "secret.svs"
    shutil.copy(shared_slide("small.svs"), outside)
    (import_root / "link.svs").symlink_to(outside)
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("import_slides", "Lung pilot", ".", stdout=io.StringIO(), stderr=err)
    assert "'link.svs' links outside the import directory; it was skipped." in err.getvalue()
    assert Slide.objects.count() == 0


def test_it_says_so_when_the_directory_is_empty(media, import_root, project):  # type: ignore[no-untyped-def]
    (import_root / "empty").mkdir()
    with pytest.raises(CommandError, match=r"'empty' has no files to import\."):
        run("Lung pilot", "empty")


def test_it_names_a_missing_directory_and_an_unknown_project(media, import_root, project):  # type: ignore[no-untyped-def]
    with pytest.raises(CommandError, match="'nowhere' does not exist under the import directory"):
        run("Lung pilot", "nowhere")
    with pytest.raises(CommandError, match=r"No project has the id or name 'Nope'\."):
        run("Nope", ".")
    with pytest.raises(CommandError, match=r"No project has the id or name '999999'\."):
        run("999999", ".")


def test_a_second_import_of_the_same_files_refuses_the_duplicates(media, import_root, project):  # type: ignore[no-untyped-def]
    shutil.copy(shared_slide("small.svs"), import_root / "small.svs")
    run("Lung pilot", ".", "--now")
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("import_slides", "Lung pilot", ".", stdout=io.StringIO(), stderr=err)
    first = Slide.objects.get()
    assert f"'small.svs' is already in this project as slide 'small.svs' (id {first.pk})" in err.getvalue()
    assert_no_stray_media()
