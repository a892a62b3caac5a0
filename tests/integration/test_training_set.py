"""Training-set export (annotations.training_set): a streamed zip of labelled patches in the layout
``simulate`` reads, through the API and the management command, and back through ``simulate``."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from annotations import consensus, voting
from annotations.models import Consensus, Patch, Project, Role, Slide, Vote
from annotations.slides import ingest
from learner.models import TrainingRound
from tests.conftest import SLIDES_DIR
from tests.factories import ProjectFactory, api_client, copy_slide, member

pytestmark = pytest.mark.django_db

CLASSES = [("tumour", "#d62728"), ("stroma/other", "#2ca02c")]  # a slash: the folder name must not split


def labelled_project(groups: int = 2, per_class: int = 3, patch_size: int = 64) -> tuple[Project, Any, list[Patch]]:
    """A project over the real CMU-1 region: ``groups`` slides (one file, several patients), each with
    ``per_class`` patches of each class labelled by an expert (votes_required 1: final labels)."""
    project = ProjectFactory(patch_size=patch_size, votes_required=1, classes=CLASSES)
    expert = member(project, Role.EXPERT, username="dr_tt")
    first = ingest.add_slide_from_path(project, SLIDES_DIR / "cmu-1-small-region.svs", launch=False, group="patient-0")
    ingest.ingest(first.pk)
    first.refresh_from_db()
    each = 2 * per_class
    grid = list(Patch.objects.filter(slide=first).order_by("-tissue_fraction", "pk")[: groups * each])
    slides = [first]
    for g in range(1, groups):
        slides.append(copy_slide(first, project, name=f"copy-{g}.svs", group=f"patient-{g}", checksum=f"{g:064x}"))
    labelled: list[Patch] = []
    for g, slide in enumerate(slides):
        # Different places of the one file per patient: no two exported images are byte-identical.
        for n, template in enumerate(grid[g * each : (g + 1) * each]):
            patch, _ = Patch.objects.get_or_create(
                slide=slide,
                x=template.x,
                y=template.y,
                size=template.size,
                magnification=template.magnification,
                defaults={"project": project},
            )
            voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=CLASSES[n % 2][0])
            labelled.append(patch)
    return project, expert, labelled


def download(client: Any, project: Project, query: str = "") -> zipfile.ZipFile:
    response = client.get(f"/api/v1/projects/{project.pk}/training-set/{query}")
    assert response.status_code == 200, response.content if not response.streaming else response.status_code
    assert response["Content-Type"] == "application/zip"
    assert response.streaming
    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))


def test_the_zip_holds_every_final_label_as_class_group_patch_png_and_a_manifest() -> None:
    project, expert, patches = labelled_project()
    crowd_member = member(project, Role.CROWD, username="student")
    # A pending patch (crowd vote below votes_required 2) must not be exported by default.
    Project.objects.filter(pk=project.pk).update(votes_required=2)
    project.refresh_from_db()
    spare = Patch.objects.filter(project=project).exclude(pk__in=[p.pk for p in patches]).first()
    assert spare is not None
    tumour = project.label_classes.get(name="tumour")
    Vote.objects.create(project=project, patch=spare, annotator=crowd_member, label=tumour, role=Role.CROWD)
    consensus.recompute_consensus(project, spare)
    assert Consensus.objects.get(patch=spare).status == Consensus.Status.PENDING

    archive = download(api_client(expert), project)
    assert archive.testzip() is None
    names = archive.namelist()
    assert names[0] == "manifest.csv"
    rows = list(csv.DictReader(io.TextIOWrapper(archive.open("manifest.csv"), encoding="utf-8")))
    assert len(rows) == len(patches) == len(names) - 1
    by_id = {int(r["patch_id"]): r for r in rows}
    assert set(by_id) == {p.pk for p in patches}
    slide_names = dict(Slide.objects.filter(project=project).values_list("pk", "name"))
    for patch in patches:
        row = by_id[patch.pk]
        consensus_row = Consensus.objects.get(patch=patch)
        assert row["label"] == consensus_row.label.name  # type: ignore[union-attr]
        folder = row["label"].replace("/", "_")
        group = Slide.objects.get(pk=patch.slide_id).group
        assert row["path"] == f"{folder}/{group}/{patch.pk}.png" and row["path"] in names
        assert row["group_id"] == group and row["slide"] == slide_names[patch.slide_id]
        assert (int(row["x"]), int(row["y"]), int(row["size"])) == (patch.x, patch.y, patch.size)
        assert json.loads(row["posterior"]) == pytest.approx(consensus_row.posterior)
        assert row["status"] in ("agreed", "expert")
        votes = json.loads(row["votes"])
        assert votes == [{"annotator": "dr_tt", "label": row["label"], "role": "expert", "provenance": "manual"}]
        assert row["provenance"] == "manual"
    with Image.open(archive.open(by_id[patches[0].pk]["path"])) as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        # The pixels are the patch's (lossless), not a blank canvas.
        from annotations.slides import tiles

        expected = tiles.read_patch(Patch.objects.select_related("slide", "project").get(pk=patches[0].pk))
        assert list(image.getdata()) == list(expected.getdata())
    assert spare.pk not in by_id

    # Only expert-decided labels, when asked.
    experts_only = download(api_client(expert), project, "?status=expert")
    assert len(experts_only.namelist()) == 1 + Consensus.objects.filter(project=project, status="expert").count()

    # Crowd members may not take the training set; other projects' members do not see the project.
    assert api_client(crowd_member).get(f"/api/v1/projects/{project.pk}/training-set/").status_code == 403
    outsider = member(ProjectFactory(), Role.ADMIN)
    assert api_client(outsider).get(f"/api/v1/projects/{project.pk}/training-set/").status_code == 404


@pytest.mark.parametrize("status", ["bogus", ",", "pending", "agreed,../../etc"])
def test_an_unknown_status_is_a_400_with_the_choices(status: str) -> None:
    project = ProjectFactory()
    response = api_client(member(project, Role.ADMIN)).get(
        f"/api/v1/projects/{project.pk}/training-set/?status={status}"
    )
    assert response.status_code == 400
    assert "agreed" in response.json()["detail"] and "contested" in response.json()["detail"]


def test_an_empty_project_exports_a_valid_zip_with_only_the_header() -> None:
    project = ProjectFactory()
    archive = download(api_client(member(project, Role.ADMIN)), project)
    assert archive.namelist() == ["manifest.csv"]
    assert archive.read("manifest.csv").decode().startswith("path,label,group_id,patch_id")


def test_region_and_label_imports_show_their_provenance(tmp_path: Path) -> None:
    project, expert, patches = labelled_project(groups=1, per_class=1)
    second = member(project, Role.EXPERT, username="dr_two")
    x, y, name = patches[0].x, patches[0].y, Slide.objects.get(pk=patches[0].slide_id).name
    upload = io.BytesIO(f"slide,x,y,label\n{name},{x},{y},tumour\n".encode())
    upload.name = "labels.csv"
    assert api_client(second).post(f"/api/v1/projects/{project.pk}/import/", {"file": upload}).status_code == 201
    assert Vote.objects.get(annotator=second).provenance == Vote.Provenance.LABEL_IMPORT
    archive = download(api_client(expert), project, "?status=agreed,expert,contested")
    rows = {int(r["patch_id"]): r for r in csv.DictReader(io.TextIOWrapper(archive.open("manifest.csv")))}
    assert rows[patches[0].pk]["provenance"] == "label-import;manual"


def test_the_command_writes_the_same_archive_and_simulate_runs_on_it(tmp_path: Path) -> None:
    project, *_ = labelled_project(groups=6, per_class=4)
    out = tmp_path / "set.zip"
    call_command("export_training_set", str(project.pk), str(out))
    assert not (tmp_path / "set.zip.partial").exists()
    archive = zipfile.ZipFile(out)
    assert len(archive.namelist()) == 1 + 6 * 8

    sim_out = tmp_path / "sim"
    call_command(
        "simulate", str(out), "--arms=random", "--seeds=1", "--labelling=oracle", "--budgets=6,12",
        "--gold-size=0", "--test-fraction=0.34", "--no-extra-heads", f"--out={sim_out}", "--tag=zip",
        f"--source-project=from zip {project.pk}",
    )  # fmt: skip
    rows = list(csv.DictReader((sim_out / "rounds.csv").open()))
    assert [int(r["budget"]) for r in rows] == [6, 12]
    source = Project.objects.get(name=f"from zip {project.pk}")
    # The simulation's classes are the exported labels, slash and all (read from the manifest).
    assert sorted(source.label_classes.values_list("name", flat=True)) == sorted(c for c, _ in CLASSES)
    assert Slide.objects.filter(project=source, status="ready").count() == 6 * 8
    sim_project = Project.objects.get(name="sim zip oracle random seed 0")
    assert TrainingRound.objects.filter(project=sim_project, state="succeeded").count() >= 2


def test_the_command_refuses_a_bad_status_and_leaves_no_file(tmp_path: Path) -> None:
    project = ProjectFactory()
    with pytest.raises(CommandError, match="Choose consensus statuses"):
        call_command("export_training_set", str(project.pk), str(tmp_path / "x.zip"), "--status=nope")
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_a_zip_whose_names_climb_out(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("a/g/1.png", b"x")
        zf.writestr("../../escape.png", b"x")
    with pytest.raises(CommandError, match="unpack outside"):
        call_command("simulate", str(bad), f"--out={tmp_path / 'o'}", "--tag=bad")
    assert not (tmp_path / "escape.png").exists()


@pytest.mark.django_db(transaction=True)
def test_the_asgi_server_streams_the_zip_in_chunks(tmp_path: Path) -> None:
    """Through the real server (uvicorn, histoloop.asgi): chunked, no Content-Length, a whole archive.
    Under ASGI a sync iterator would be read to the end into memory first; zip_stream pulls it."""
    import http.client

    from rest_framework.authtoken.models import Token

    from tests.integration import conftest as integration
    from tests.servers import asgi_server, server_env

    project, expert, patches = labelled_project(groups=1, per_class=2)
    token = Token.objects.create(user=expert)
    with asgi_server(server_env(integration.test_database_url()), tmp_path / "server.log") as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request(
            "GET", f"/api/v1/projects/{project.pk}/training-set/", headers={"Authorization": f"Token {token.key}"}
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/zip"
        assert response.getheader("Content-Length") is None
        assert response.getheader("Transfer-Encoding") == "chunked"
        body = response.read()
        connection.close()
    # Django warns when it has to read a sync iterator whole before serving it under ASGI.
    assert "must consume synchronous iterators" not in (tmp_path / "server.log").read_text()
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    assert sorted(n for n in archive.namelist() if n.endswith(".png")) == sorted(
        f"{'tumour' if n % 2 == 0 else 'stroma_other'}/patient-0/{p.pk}.png" for n, p in enumerate(patches)
    )
