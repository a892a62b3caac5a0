"""Backbone factory: the shipped ImageNet weights really load (a cat is recognised as a cat)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from learner.core.backbone import create_backbone, create_model, match_state_dict, packaged_weights_path
from learner.core.config import BackboneSpec
from learner.core.data import normalise, to_tensor
from learner.core.embeddings import pooled_features
from learner.core.errors import LearnerError

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())  # a photo of a cat, bundled with scikit-image


def imagenet_proba(spec: BackboneSpec, image: Image.Image) -> torch.Tensor:
    built = create_model(spec)
    x = normalise(to_tensor(image, 224).unsqueeze(0), built.normalisation)
    with torch.no_grad():
        return torch.softmax(built.model.eval()(x), dim=1)[0]


def test_packaged_imagenet_weights_see_a_cat(chelsea: Image.Image) -> None:
    proba = imagenet_proba(BackboneSpec(), chelsea)
    top5 = proba.topk(5).indices.tolist()
    assert top5[0] in IMAGENET_CATS
    assert float(proba[list(IMAGENET_CATS)].sum()) > 0.5


def test_random_init_does_not(chelsea: Image.Image) -> None:
    proba = imagenet_proba(BackboneSpec(weights="none"), chelsea)
    assert float(proba[list(IMAGENET_CATS)].sum()) < 0.05
    assert float(proba.max()) < 0.2


def test_normalisation_is_the_tf_lite_one() -> None:
    built = create_backbone()
    assert built.normalisation.mean == (0.5, 0.5, 0.5) and built.normalisation.std == (0.5, 0.5, 0.5)
    assert built.num_features == 1280
    assert built.model.num_classes == 0  # type: ignore[union-attr]


def test_a_local_weights_file_loads_the_same_weights(tmp_path: Path) -> None:
    local = tmp_path / "lite0.pth"
    shutil.copy(packaged_weights_path("tf_efficientnet_lite0"), local)
    from_file = create_backbone(BackboneSpec(weights=str(local)))
    from_package = create_backbone(BackboneSpec())
    assert from_file.weights_id == from_package.weights_id  # content hash, not path
    for (k, a), b in zip(from_file.model.state_dict().items(), from_package.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_weights_are_matched_by_order_only_when_every_shape_agrees() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    renamed = {f"other.{i}": v for i, v in enumerate(model.state_dict().values())}
    assert list(match_state_dict(model, renamed)) == list(model.state_dict())
    swapped = dict(reversed(list(renamed.items())))
    with pytest.raises(LearnerError, match="do not fit"):
        match_state_dict(model, swapped)


def test_wrong_weights_file_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(LearnerError, match="do not fit the model"):
        create_backbone(BackboneSpec(weights=str(bad)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LearnerError, match="Could not read weights"):
        create_backbone(BackboneSpec(weights=str(garbage)))
    with pytest.raises(LearnerError, match="does not exist"):
        create_backbone(BackboneSpec(weights=str(tmp_path / "missing.pth")))


def test_unknown_backbone_and_unpackaged_weights_are_refused() -> None:
    with pytest.raises(LearnerError, match="Unknown backbone 'resnet9000'"):
        create_backbone(BackboneSpec(name="resnet9000"))
    with pytest.raises(LearnerError, match="No installable package ships weights for backbone 'resnet18'"):
        create_backbone(BackboneSpec(name="resnet18"))


def test_multiscale_appends_the_last_three_stages_to_the_final_features() -> None:
    plain, ms = create_backbone(), create_backbone(BackboneSpec(multiscale=True))
    assert ms.pooled_stages == (4, 5, 6) and ms.cache_id != plain.cache_id
    assert ms.num_features == 1280 + 112 + 192 + 320  # efficientnet-lite0's last three stages
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a = pooled_features(plain.model.eval(), x)
        b = pooled_features(ms.model.eval(), x)
    assert b.shape == (2, ms.num_features)
    torch.testing.assert_close(b[:, :1280], a)
    assert b[:, 1280:].abs().sum() > 0


def test_multiscale_leaves_architectures_without_stage_blocks_as_they_are() -> None:
    resnet = create_backbone(BackboneSpec(name="resnet18", weights="none", multiscale=True))
    assert resnet.pooled_stages == () and resnet.num_features == 512
    assert resnet.cache_id == create_backbone(BackboneSpec(name="resnet18", weights="none")).cache_id
