"""Any backbone through the platform: a project names a ViT and its weights file, the API refuses weights of
another architecture before saving, and a round run by the real worker trains on the ViT's embeddings (or
fails, with the reason, when the file was swapped behind the API's back)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from django.conf import settings as django_settings

from annotations.models import AnnotationTask, Project, Role
from learner import embedding, round_stages
from learner.conf import learner_settings
from learner.core.classifier import load_model
from learner.models import ModelVersion, TrainingRound
from tests.factories import ProjectFactory, UserFactory, api_client, member
from tests.integration.conftest import wait_for
from tests.integration.lc25000 import add_lc25000_slides, manifest_rows
from tests.integration.test_rounds import lung_project

VIT = "vit_tiny_patch16_224"


@pytest.fixture
def weights() -> Iterator[dict[str, str]]:
    """A ViT-Tiny (random init, classifier included) and a ResNet-18 state dict written under the workers'
    LEARNER_PRETRAINED_DIR, by their paths relative to it; removed afterwards."""
    root = Path(django_settings.LEARNER["PRETRAINED_DIR"])
    folder = root / f"test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), folder / "vit-tiny.pth")
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), folder / "resnet18.pth")
    yield {"vit": f"{folder.name}/vit-tiny.pth", "resnet": f"{folder.name}/resnet18.pth", "folder": str(folder)}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.django_db
def test_the_api_refuses_weights_of_another_architecture_and_saves_nothing(weights: dict[str, str]) -> None:
    staff = api_client(UserFactory(is_staff=True))
    before = Project.objects.count()
    bad = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT, "backbone_weights": weights["resnet"]})
    assert bad.status_code == 400
    assert f"is not one of the backbone '{VIT}'" in bad.json()["backbone_weights"][0]
    unknown = staff.post("/api/v1/projects/", {"name": "vit", "backbone": "resnet9000"})
    assert unknown.status_code == 400 and "Unknown backbone 'resnet9000'" in unknown.json()["backbone"][0]
    outside = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT, "backbone_weights": "../../x.pth"})
    assert outside.status_code == 400 and "inside LEARNER_PRETRAINED_DIR" in outside.json()["backbone_weights"][0]
    missing = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT, "backbone_weights": "nowhere.pth"})
    assert missing.status_code == 400 and "does not exist" in missing.json()["backbone_weights"][0]
    too_long = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT, "backbone_weights": "a" * 300})
    assert too_long.status_code == 400 and "cannot be read" in too_long.json()["backbone_weights"][0]
    no_package = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT})  # LEARNER_PRETRAINED=package
    assert no_package.status_code == 400 and "No installable package" in no_package.json()["backbone_weights"][0]
    assert Project.objects.count() == before

    created = staff.post("/api/v1/projects/", {"name": "vit", "backbone": VIT, "backbone_weights": weights["vit"]})
    assert created.status_code == 201, created.content
    project = Project.objects.get(pk=created.json()["id"])
    assert (project.backbone, project.backbone_weights) == (VIT, weights["vit"])

    admin = api_client(member(project, Role.ADMIN))
    url = f"/api/v1/projects/{project.pk}/"
    swapped = admin.patch(url, {"backbone_weights": weights["resnet"]})
    assert swapped.status_code == 400 and "do not fit the model" in swapped.json()["backbone_weights"][0]
    # The name alone changing is checked against the weights too: UNI is a ViT-L, the file a ViT-Tiny.
    uni = admin.patch(url, {"backbone": "hf-hub:MahmoodLab/UNI"})
    assert uni.status_code == 400
    assert "is not one of the backbone 'hf-hub:MahmoodLab/UNI'" in uni.json()["backbone_weights"][0]
    project.refresh_from_db()
    assert (project.backbone, project.backbone_weights) == (VIT, weights["vit"])
    # Settings that do not touch the backbone are not held up by it.
    Path(weights["folder"], "vit-tiny.pth").unlink()
    assert admin.patch(url, {"description": "lung"}).status_code == 200


@pytest.mark.django_db
def test_a_transformer_is_fed_at_its_own_input_size(weights: dict[str, str]) -> None:
    cfg = learner_settings()
    vit = embedding.platform_backbone(VIT, cfg, weights["vit"])
    assert embedding.image_size(64, vit) == 224 and embedding.image_size(512, vit) == 224
    assert embedding.image_size(64, embedding.platform_backbone("tf_efficientnet_lite0", cfg)) == 64
    store = embedding.store_for(vit, 64, cfg)
    assert store.model_id.startswith(f"{VIT}-{vit.weights_id}-224px") and store.dim == 192
    # A round's training config (and so the classifier it saves, which exports read) says 224 too.
    project = ProjectFactory(patch_size=64, backbone=VIT, backbone_weights=weights["vit"])
    setup = round_stages.RoundSetup.of(project, 1, ["a", "b"], cfg)
    assert setup.config.image_size == 64
    assert setup.for_backbone(vit, project.patch_size).config.image_size == 224


@pytest.mark.django_db(transaction=True)
def test_a_round_on_a_vit_loaded_from_a_file_trains_and_publishes(celery_worker_process, weights) -> None:  # type: ignore[no-untyped-def]
    project = lung_project(per_class=6, labelled_per_class=4, backbone=VIT, backbone_weights=weights["vit"])
    admin = api_client(member(project, Role.ADMIN))
    response = admin.post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 201, response.content
    round_ = wait_for(
        lambda: TrainingRound.objects.filter(pk=response.json()["id"], state__in=["succeeded", "failed"]).first(),
        timeout=300,
        message="the ViT round",
    )
    assert round_.state == "succeeded", (round_.error, celery_worker_process.log_path.read_text()[-3000:])
    version = ModelVersion.objects.get(round=round_)
    assert version.backbone == VIT
    classifier = load_model(version.weights_path)
    assert classifier.spec.name == VIT and classifier.image_size == 224
    assert classifier.network.linear.in_features == 192  # type: ignore[union-attr]  # the ViT's class token
    cfg = learner_settings()
    vit = embedding.project_backbone(project, cfg)
    assert classifier.weights_id == vit.weights_id
    store = embedding.store_for(vit, project.patch_size, cfg)
    assert any(store.root.joinpath(store.model_id).rglob("*.npy")), "the round's vectors are in the ViT's store"
    assert round_.metrics["embedding"]["patches"] == project.patches.count()


@pytest.mark.django_db(transaction=True)
def test_a_round_whose_weights_file_no_longer_fits_fails_with_the_reason(celery_worker_process, weights) -> None:  # type: ignore[no-untyped-def]
    # Saved past the API (the file was replaced on disk after the project was set up).
    project = ProjectFactory(
        classes=[("a", "#d62728"), ("b", "#2ca02c")], backbone=VIT, backbone_weights=weights["resnet"]
    )
    add_lc25000_slides(project, manifest_rows(2, groups_per_class=2))
    tasks_before = AnnotationTask.objects.filter(project=project).count()
    admin = api_client(member(project, Role.ADMIN))
    response = admin.post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 201, response.content
    round_ = wait_for(
        lambda: TrainingRound.objects.filter(pk=response.json()["id"], state__in=["succeeded", "failed"]).first(),
        timeout=180,
        message="the round to fail",
    )
    assert round_.state == "failed"
    assert f"is not one of the backbone '{VIT}'" in round_.error and "do not fit the model" in round_.error
    assert not ModelVersion.objects.filter(project=project).exists()
    assert AnnotationTask.objects.filter(project=project).count() == tasks_before
