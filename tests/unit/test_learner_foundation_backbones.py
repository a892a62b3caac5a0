"""Any timm backbone, vision transformers and hub foundation models included, with weights from a local file.

Nothing here touches the network: the weights are written by the tests, and the foundation models are built
on the meta device (their architecture, not their gigabytes) from the recipes in learner.core.sources.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from learner.core import runtime, sources
from learner.core.backbone import check_backbone, create_backbone, create_model, safe_name
from learner.core.config import BackboneSpec
from learner.core.embeddings import embed, embedding_model_id, pooled_features
from learner.core.errors import LearnerError

VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ViT-Tiny's state dict (classifier included), as a lab would save one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit-tiny.pth"
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)


def test_a_vit_loads_the_weights_of_its_file_and_is_fed_at_its_own_size(vit_file: Path) -> None:
    built = create_backbone(BackboneSpec(VIT, str(vit_file), multiscale=True))
    saved = torch.load(vit_file, weights_only=True)
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert built.num_features == 192 and built.input_size == 224
    assert built.pooled_stages == ()  # a transformer's blocks are not stages: no multiscale pooling
    assert built.normalisation.mean == (0.5, 0.5, 0.5)  # from the architecture's pretrained_cfg
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = pooled_features(built.model.eval(), x)
        tokens = built.model.forward_features(x)  # type: ignore[operator]
    assert features.shape == (2, 192)
    torch.testing.assert_close(features, tokens[:, 0])  # the class token


def test_a_feature_checkpoint_without_a_classifier_loads_as_safetensors(tmp_path: Path) -> None:
    body = timm.create_model(VIT, pretrained=False, num_classes=0)
    path = tmp_path / "model.safetensors"
    save_file(body.state_dict(), str(path))
    check_backbone(BackboneSpec(VIT, str(path)))
    built = create_backbone(BackboneSpec(VIT, str(path)))
    torch.testing.assert_close(
        built.model.state_dict()["blocks.3.mlp.fc1.weight"], body.state_dict()["blocks.3.mlp.fc1.weight"]
    )
    assert create_model(BackboneSpec(VIT, str(path)), num_classes=3).model.num_classes == 3  # type: ignore[union-attr]


def test_weights_of_another_architecture_are_refused_with_the_backbone_named(resnet_file: Path) -> None:
    for attempt in (check_backbone, create_backbone):
        with pytest.raises(LearnerError, match=f"is not one of the backbone '{VIT}'.*do not fit the model"):
            attempt(BackboneSpec(VIT, str(resnet_file)))  # type: ignore[operator]


def test_a_vit_of_another_width_is_refused_by_shape(tmp_path: Path) -> None:
    small = tmp_path / "vit-small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), str(small))
    with pytest.raises(LearnerError, match=r"shape mismatch for .*\(384.*vs \(192"):
        check_backbone(BackboneSpec(VIT, str(small)))


def _hub_folder(folder: Path, mean: list[float], global_pool: str = "") -> Path:
    """A hub repository as `huggingface-cli download` leaves it: timm's config.json and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": VIT,
        "model_args": {"num_classes": 0, "global_pool": global_pool},
        "pretrained_cfg": {"tag": "lab", "mean": mean, "std": [0.2, 0.2, 0.2], "input_size": [3, 224, 224]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    save_file(timm.create_model(VIT, pretrained=False, num_classes=0).state_dict(), str(folder / "model.safetensors"))
    return folder


def test_a_hub_model_is_built_offline_from_the_config_beside_its_weights(tmp_path: Path, no_hub: None) -> None:
    folder = _hub_folder(tmp_path / "lab-tiny", [0.7, 0.6, 0.7])
    spec = BackboneSpec("hf-hub:lab/tiny", str(folder), multiscale=True)
    check_backbone(spec)
    built = create_backbone(spec)
    assert built.normalisation.mean == (0.7, 0.6, 0.7) and built.normalisation.std == (0.2, 0.2, 0.2)
    # global_pool "" (every token out, as Virchow is published): class token + mean patch token, 2 x 192
    assert built.token_pooling == "cls+mean" and built.num_features == 384
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = built.model.model.forward_features(x)  # type: ignore[union-attr, operator]
        want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
        torch.testing.assert_close(pooled_features(built.model.eval(), x), want)
    assert "/" not in built.cache_id and ":" not in built.cache_id
    # The config decides the network and its input: another config, the same weights, another identity.
    other = _hub_folder(tmp_path / "lab-tiny-2", [0.5, 0.5, 0.5])
    assert create_backbone(BackboneSpec("hf-hub:lab/tiny", str(other))).weights_id != built.weights_id


def test_a_hub_id_not_known_offline_and_without_a_config_says_what_to_do(tmp_path: Path, vit_file: Path) -> None:
    with pytest.raises(LearnerError, match=r"cannot be built offline: put the repository's config\.json"):
        check_backbone(BackboneSpec("hf-hub:someone/unlisted", str(vit_file)))
    with pytest.raises(LearnerError, match="Download them from its Hugging Face model card"):
        check_backbone(BackboneSpec("hf-hub:MahmoodLab/UNI"))  # weights "package": no package ships them
    with pytest.raises(LearnerError, match="not a Hugging Face hub id"):
        check_backbone(BackboneSpec("hf-hub:no-slash", "none"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))  # a transformers repository
    with pytest.raises(LearnerError, match="is not a timm model configuration"):
        check_backbone(BackboneSpec("hf-hub:owkin/phikon-v2", str(tmp_path)))


@pytest.mark.parametrize(
    ("name", "width", "millions"),
    [
        ("hf-hub:MahmoodLab/UNI", 1024, 303),
        ("hf-hub:MahmoodLab/UNI2-h", 1536, 681),
        ("hf-hub:paige-ai/Virchow2", 1280, 631),
        ("hf-hub:bioptimus/H-optimus-0", 1536, 1134),
        ("hf-hub:prov-gigapath/prov-gigapath", 1536, 1134),
    ],
)
def test_the_pathology_foundation_models_are_built_offline_as_published(
    name: str, width: int, millions: int, no_hub: None
) -> None:
    """The architectures their model cards give (parameter counts as published), without the hub or memory."""
    check_backbone(BackboneSpec(name, "none"))
    recipe = sources.recipe(name, None)
    with torch.device("meta"):
        model = timm.create_model(recipe.architecture, pretrained=False, **recipe.kwargs)
    assert model.num_features == width
    assert sum(p.numel() for p in model.parameters()) // 10**6 == millions
    assert recipe.pretrained_cfg["input_size"] == (3, 224, 224)


def test_h_optimus_carries_its_own_normalisation() -> None:
    recipe = sources.recipe("hf-hub:bioptimus/H-optimus-0", None)
    assert recipe.pretrained_cfg["mean"] == (0.707223, 0.578729, 0.703617)
    assert sources.recipe("hf-hub:MahmoodLab/uni", None).pretrained_cfg["mean"] == sources.IMAGENET_MEAN


def test_store_names_carry_the_backbone_and_its_weights(vit_file: Path, tmp_path: Path) -> None:
    assert safe_name(VIT) == VIT  # timm names keep their folders
    assert safe_name("hf-hub:lab/tiny") != safe_name("hf-hub:lab_tiny")
    vit = create_backbone(BackboneSpec(VIT, str(vit_file)))
    other_weights = tmp_path / "other.pth"
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), other_weights)
    ids = {
        embedding_model_id(vit, 224, False),
        embedding_model_id(create_backbone(BackboneSpec(VIT, str(other_weights))), 224, False),
        embedding_model_id(create_backbone(BackboneSpec(VIT, "none")), 224, False),
    }
    assert len(ids) == 3 and all(i.startswith(VIT) for i in ids)


def test_a_vit_embeds_under_onnx_runtime_like_torch(vit_file: Path, tmp_path: Path) -> None:
    runtime.forget_loaded()
    built = create_backbone(BackboneSpec(VIT, str(vit_file)))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(5)]
    eager = embed(built, images, image_size=224, device="cpu")
    onnx = embed(built, images, image_size=224, device="cpu", backend="onnxruntime", runtime_cache=tmp_path)
    assert eager.shape == (5, 192)
    assert float(np.abs(eager - onnx).max()) <= runtime.EMBED_ATOL
    assert (tmp_path / embedding_model_id(built, 224, False) / "model.onnx").is_file()


def test_a_vit_whose_export_fails_falls_back_to_torch_with_the_reason_logged(
    vit_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime.forget_loaded()
    built = create_backbone(BackboneSpec(VIT, str(vit_file)))

    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exporting the operator 'aten::fancy_attention' to ONNX is not supported")

    monkeypatch.setattr(runtime.torch.onnx, "export", unsupported)
    images = [Image.new("RGB", (32, 32), (200, 120, 180))] * 2
    with caplog.at_level(logging.WARNING, logger="learner.core.runtime"):
        got = embed(built, images, image_size=224, device="cpu", backend="auto", runtime_cache=tmp_path)
    np.testing.assert_allclose(got, embed(built, images, image_size=224, device="cpu"), atol=1e-6)
    assert any(
        "Embedding with torch instead of" in r.message and "fancy_attention" in r.message for r in caplog.records
    )
