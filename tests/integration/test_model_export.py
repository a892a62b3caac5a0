"""Model export (learner.model_export) through the API and the command, run by the real clients: a round
trained by the real worker on the CMU-1 region, exported as a WSInfer model and run by ``wsinfer run`` (in
its own cached virtualenv, tests/wsinfer_env.py) on the same slide, and exported as ONNX and run by ONNX
Runtime; both give the platform's own stored probabilities for the same patches."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from annotations import voting
from annotations.models import Patch, Project, Role
from annotations.slides import ingest, tiles
from learner import model_export, scores
from learner.core.backbone import Normalisation
from learner.core.classifier import Classifier, LinearHead, save_model
from learner.core.config import BackboneSpec
from learner.models import ModelVersion, TrainingRound
from tests import wsinfer_env
from tests.conftest import SLIDES_DIR
from tests.factories import ProjectFactory, api_client, member
from tests.integration.conftest import wait_for

SLIDE = SLIDES_DIR / "cmu-1-small-region.svs"  # 2220 x 2967 px, 0.499 µm/px, 20x
CLASSES = [("dense", "#d62728"), ("sparse", "#2ca02c")]
# Largest difference in a class probability accepted between WSInfer and the platform for one patch.
PROBABILITY_ATOL = 1e-3


def export_zip(client: Any, project: Project, version_id: int, fmt: str) -> zipfile.ZipFile:
    response = client.get(f"/api/v1/projects/{project.pk}/models/{version_id}/export/?format={fmt}")
    assert response.status_code == 200, response.content if not response.streaming else response.status_code
    assert response["Content-Type"] == "application/zip" and response.streaming
    assert f"round-1-{fmt}.zip" in response["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert archive.testzip() is None
    return archive


def platform_scores(version: ModelVersion, slide_id: int) -> dict[tuple[int, int], np.ndarray]:
    """The round's stored probabilities of each scored patch of the slide, by its level-0 (x, y)."""
    ids, probs = scores.for_slide(version, slide_id)
    where = {pk: (x, y) for pk, x, y in Patch.objects.filter(pk__in=ids.tolist()).values_list("pk", "x", "y")}
    return {where[int(pk)]: row for pk, row in zip(ids, probs, strict=True)}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_model_exported_for_wsinfer_runs_in_wsinfer_and_onnx_and_gives_the_platform_s_probabilities(
    celery_worker_process: Any, tmp_path: Path, capsys: Any
) -> None:
    wsinfer = wsinfer_env.wsinfer_executable()  # first, so a broken client environment fails before the round
    project = ProjectFactory(patch_size=224, magnification=20.0, votes_required=1, classes=CLASSES, batch_size=4)
    slide = ingest.add_slide_from_path(project, SLIDE, launch=False)
    ingest.ingest(slide.pk)
    slide.refresh_from_db()
    assert slide.status == "ready" and slide.mpp == pytest.approx(0.499) and slide.magnification == 20
    # Labels with a signal the head can learn: the densest and the sparsest tissue of the grid.
    grid = list(Patch.objects.filter(slide=slide).order_by("-tissue_fraction", "pk"))
    assert len(grid) >= 30
    expert = member(project, Role.EXPERT, username="dr_export")
    for patch in grid[:8]:
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label="dense")
    for patch in grid[-8:]:
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label="sparse")
    admin = member(project, Role.ADMIN, username="export_admin")
    response = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 201, response.content
    round_ = wait_for(
        lambda: TrainingRound.objects.filter(pk=response.json()["id"], state__in=["succeeded", "failed"]).first(),
        timeout=600,
        message="the round",
    )
    assert round_.state == "succeeded", (round_.error, celery_worker_process.log_path.read_text()[-3000:])
    version = ModelVersion.objects.get(round=round_)
    ours = platform_scores(version, slide.pk)
    assert len(ours) == len(grid)

    # --- WSInfer: the zip holds one model folder, config.json in the wsinfer-zoo schema.
    started = time.monotonic()
    archive = export_zip(api_client(expert), project, version.pk, "wsinfer")
    folder = f"histoloop-project-{project.pk}-round-1"
    assert sorted(archive.namelist()) == [f"{folder}/config.json", f"{folder}/torchscript_model.pt"]
    archive.extractall(tmp_path / "models")
    config = json.loads(archive.read(f"{folder}/config.json"))
    assert config["class_names"] == ["dense", "sparse"] and config["num_classes"] == 2
    assert config["patch_size_pixels"] == 224 and config["spacing_um_px"] == pytest.approx(0.499)
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert [t["name"] for t in config["transform"]] == ["Resize", "ToTensor", "Normalize"]
    export_seconds = time.monotonic() - started

    slides = tmp_path / "slides"  # wsinfer runs on every file of a folder
    slides.mkdir()
    (slides / SLIDE.name).symlink_to(SLIDE)
    model_dir = tmp_path / "models" / folder
    started = time.monotonic()
    run = subprocess.run(
        [str(wsinfer), "run", "-i", str(slides), "-o", str(tmp_path / "results"), "-c", str(model_dir / "config.json"),
         "-p", str(model_dir / "torchscript_model.pt"), "--num-workers", "1", "--batch-size", "16"],
        env=wsinfer_env.offline_env(tmp_path / "home"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wsinfer_seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # wsinfer validated config.json against wsinfer-zoo's schema (ModelConfiguration.from_dict) to get here.
    rows = list(csv.DictReader((tmp_path / "results" / "model-outputs-csv" / f"{SLIDE.stem}.csv").open()))
    assert rows and list(rows[0])[:4] == ["minx", "miny", "width", "height"]
    assert {(int(r["width"]), int(r["height"])) for r in rows} == {(224, 224)}  # its patches are ours in size
    theirs = {
        (int(r["minx"]), int(r["miny"])): np.array([float(r["prob_dense"]), float(r["prob_sparse"])]) for r in rows
    }
    # WSInfer finds tissue its own way; on the patches both have (same grid: from (0, 0), one patch a step),
    # its probabilities are the platform's.
    shared = sorted(set(theirs) & set(ours))
    assert len(shared) >= 0.6 * min(len(theirs), len(ours)), (len(shared), len(theirs), len(ours))
    diff = np.array([np.abs(theirs[xy] - ours[xy]).max() for xy in shared])
    picked = np.array([ours[xy].argmax() for xy in shared])
    assert len(set(picked.tolist())) == 2, "the trained head should tell the two kinds of tissue apart"
    assert float(diff.max()) <= PROBABILITY_ATOL, (float(diff.max()), float(np.median(diff)))
    assert all(theirs[xy].argmax() == ours[xy].argmax() for xy in shared)

    # --- ONNX: the same network, run by ONNX Runtime on the platform's own patch pixels.
    import onnxruntime as ort

    onnx_archive = export_zip(api_client(admin), project, version.pk, "onnx")
    assert sorted(onnx_archive.namelist()) == [f"{folder}/config.json", f"{folder}/model.onnx"]
    session = ort.InferenceSession(onnx_archive.read(f"{folder}/model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    norm = config["transform"][2]["arguments"]
    sample = Patch.objects.select_related("slide", "project").filter(slide=slide).order_by("pk")[:16]
    pixels = np.stack([np.asarray(tiles.read_patch(p), dtype=np.float32) / 255.0 for p in sample])
    batch = ((pixels - np.array(norm["mean"])) / np.array(norm["std"])).transpose(0, 3, 1, 2).astype(np.float32)
    logits, probabilities = session.run(None, {"image": batch})
    want = np.stack([ours[(p.x, p.y)] for p in sample])
    onnx_diff = float(np.abs(probabilities - want).max())
    assert onnx_diff <= PROBABILITY_ATOL
    assert np.allclose(probabilities, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-6)

    # --- The command writes the same files, as a folder QuPath's extension reads, and as the API's zip.
    call_command("export_model", str(project.pk), str(tmp_path / "qupath"), "--format=wsinfer")
    placed = tmp_path / "qupath" / folder
    assert sorted(p.name for p in placed.iterdir()) == ["config.json", "torchscript_model.pt"]
    assert (placed / "torchscript_model.pt").read_bytes() == (model_dir / "torchscript_model.pt").read_bytes()
    call_command(
        "export_model", project.name, str(tmp_path / "m.zip"), "--format=onnx", f"--model-version={version.pk}"
    )
    assert zipfile.ZipFile(tmp_path / "m.zip").read(f"{folder}/model.onnx") == onnx_archive.read(f"{folder}/model.onnx")
    with capsys.disabled():
        print(
            f"\nwsinfer vs platform: {len(shared)} shared patches of {len(theirs)} (wsinfer) / {len(ours)} (platform), "
            f"max |dp| {diff.max():.2e}, median {np.median(diff):.2e}; ONNX max |dp| {onnx_diff:.2e} on {len(sample)}; "
            f"export {export_seconds:.1f} s, wsinfer run {wsinfer_seconds:.1f} s"
        )


# --- bad input: a clear 4xx, nothing written -----------------------------------------------------------------------


def small_version(project: Project, tmp_path: Path, state: str, number: int = 1, **fields: Any) -> ModelVersion:
    """A model version with a real weights file (a head on 8 features), its round in ``state``."""
    classifier = Classifier(
        mode="head",
        class_names=[name for name, _ in CLASSES],
        spec=BackboneSpec(multiscale=True),
        normalisation=Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        image_size=224,
        network=LinearHead(8, 2),
        weights_id="test",
    )
    weights = tmp_path / f"model-{project.pk}-{number}.pt"
    save_model(weights, classifier)
    round_ = TrainingRound.objects.create(
        project=project, number=number, state=state, error="Training ran out of memory." if state == "failed" else ""
    )
    return ModelVersion.objects.create(
        project=project,
        round=round_,
        backbone="tf_efficientnet_lite0",
        train_mode="head",
        weights_path=str(weights),
        class_names=[name for name, _ in CLASSES],
        **fields,
    )


def exports_written() -> list[Path]:
    root = model_export.exports_dir()
    return sorted(root.rglob("*")) if root.exists() else []


@pytest.mark.django_db
@pytest.mark.parametrize("state", ["failed", "cancelled", "running", "queued"])
def test_a_model_of_a_round_that_did_not_succeed_is_a_409_and_writes_nothing(tmp_path: Path, state: str) -> None:
    project = ProjectFactory(classes=CLASSES)
    version = small_version(project, tmp_path, state)
    before = exports_written()
    client = api_client(member(project, Role.ADMIN))
    for fmt in model_export.FORMATS:
        response = client.get(f"/api/v1/projects/{project.pk}/models/{version.pk}/export/?format={fmt}")
        assert response.status_code == 409, response.content
        assert state in response.json()["detail"] and "succeeded" in response.json()["detail"]
    if state == "failed":
        assert "out of memory" in response.json()["detail"]
    with pytest.raises(CommandError, match="Only a model of a round that succeeded"):
        call_command("export_model", str(project.pk), str(tmp_path / "out.zip"), f"--model-version={version.pk}")
    assert exports_written() == before
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "out.zip.partial").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["bogus", "", "WSINFER", "onnx;rm", "json", "api"])
def test_an_unknown_format_is_a_400_that_names_the_formats(tmp_path: Path, fmt: str) -> None:
    project = ProjectFactory(classes=CLASSES)
    version = small_version(project, tmp_path, "succeeded")
    before = exports_written()
    response = api_client(member(project, Role.EXPERT)).get(
        f"/api/v1/projects/{project.pk}/models/{version.pk}/export/", {"format": fmt}
    )
    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/json")
    assert "wsinfer" in response.json()["detail"] and "onnx" in response.json()["detail"]
    assert exports_written() == before


@pytest.mark.django_db
def test_another_project_s_version_is_a_404_and_only_experts_and_admins_may_export(tmp_path: Path) -> None:
    project, other = ProjectFactory(classes=CLASSES), ProjectFactory(classes=CLASSES)
    theirs = small_version(other, tmp_path, "succeeded")
    expert = member(project, Role.EXPERT)
    before = exports_written()
    url = f"/api/v1/projects/{project.pk}/models/{theirs.pk}/export/"
    response = api_client(expert).get(url)
    assert response.status_code == 404 and "No such model version" in response.json()["detail"]
    assert api_client(expert).get(f"/api/v1/projects/{project.pk}/models/999999/export/").status_code == 404
    mine = small_version(project, tmp_path, "succeeded")
    assert (
        api_client(member(project, Role.CROWD))
        .get(f"/api/v1/projects/{project.pk}/models/{mine.pk}/export/")
        .status_code
        == 403
    )
    outsider = member(ProjectFactory(), Role.ADMIN)
    assert api_client(outsider).get(f"/api/v1/projects/{project.pk}/models/{mine.pk}/export/").status_code == 404
    with pytest.raises(CommandError, match="No such model version"):
        call_command("export_model", str(project.pk), str(tmp_path / "x.zip"), f"--model-version={theirs.pk}")
    with pytest.raises(CommandError, match="Unknown export format"):
        call_command("export_model", str(project.pk), str(tmp_path / "x.zip"), "--format=pt")
    assert exports_written() == before and not (tmp_path / "x.zip").exists()


@pytest.mark.django_db
def test_a_pruned_version_or_one_whose_weights_are_gone_is_a_410(tmp_path: Path) -> None:
    project = ProjectFactory(classes=CLASSES)
    pruned = small_version(project, tmp_path, "succeeded", pruned_at=timezone.now())
    gone = small_version(project, tmp_path, "succeeded", number=2)
    Path(gone.weights_path).unlink()
    client = api_client(member(project, Role.ADMIN))
    before = exports_written()
    response = client.get(f"/api/v1/projects/{project.pk}/models/{pruned.pk}/export/")
    assert response.status_code == 410 and "pruned" in response.json()["detail"]
    response = client.get(f"/api/v1/projects/{project.pk}/models/{gone.pk}/export/?format=onnx")
    assert response.status_code == 410 and "missing" in response.json()["detail"]
    assert exports_written() == before


@pytest.mark.django_db
def test_the_spacing_follows_the_project_s_slides_and_defaults_to_ten_over_the_magnification() -> None:
    from tests.factories import SlideFactory

    project = ProjectFactory(magnification=10.0)
    assert model_export.spacing_um_px(project) == pytest.approx(1.0)  # no slide: 10 µm·x / 10x
    SlideFactory(project=project, mpp=0.25, magnification=40.0)  # 10
    SlideFactory(project=project, mpp=0.2527, magnification=40.0)  # 10.108
    SlideFactory(project=project, mpp=0.499, magnification=20.0)  # 9.98
    SlideFactory(project=project, mpp=None, magnification=None)
    assert model_export.spacing_um_px(project) == pytest.approx(1.0)  # the median product, 10.0, over 10x
