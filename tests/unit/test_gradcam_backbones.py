"""Grad-CAM on a vision transformer: explained at its last block over the patch-token grid, not at the
patch-embedding convolution (the only Conv2d a ViT has)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from learner.core.backbone import Normalisation
from learner.core.classifier import Classifier
from learner.core.config import BackboneSpec
from learner.core.errors import LearnerError
from learner.core.gradcam import cam_target, grad_cam, last_conv_layer, token_grid

VIT = "vit_tiny_patch16_224"


def vit_classifier(**kwargs: object) -> Classifier:
    torch.manual_seed(0)
    network = timm.create_model(VIT, pretrained=False, num_classes=3, **kwargs).eval()
    return Classifier(
        mode="finetune", class_names=["a", "b", "c"], spec=BackboneSpec(name=VIT, weights="none"),
        normalisation=Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), image_size=224, network=network,
        weights_id="test",
    )  # fmt: skip


def test_a_vit_is_explained_at_its_last_block_and_a_cnn_at_its_last_convolution() -> None:
    vit = vit_classifier().network
    layer, reshape = cam_target(vit)
    assert layer is vit.blocks[-1].norm1 and reshape is not None
    assert layer is not last_conv_layer(vit)  # the patch embedding
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert cam_target(cnn) == (cnn.layer4[-1].conv2, None)


def test_the_token_grid_drops_the_class_and_register_tokens_and_keeps_each_patch_in_its_place() -> None:
    side, channels, prefix = 4, 2, 3
    patches = torch.arange(side * side, dtype=torch.float32).repeat(channels, 1).T  # token i holds i
    tokens = torch.cat([torch.full((prefix, channels), -1.0), patches])[None]
    grid = token_grid(prefix)(tokens)
    assert grid.shape == (1, channels, side, side)
    assert torch.equal(grid[0, 1], torch.arange(16, dtype=torch.float32).reshape(4, 4))
    with pytest.raises(LearnerError, match="square grid"):
        token_grid(prefix + 1)(tokens)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_grad_cam_of_a_vit_gives_a_varying_map_at_the_input_size(reg_tokens: int) -> None:
    clf = vit_classifier(reg_tokens=reg_tokens)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    heat, cls = grad_cam(clf, image, target_class=2)
    assert heat.shape == (224, 224) and heat.dtype == np.float32 and cls == 2
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.std() > 0.01
    # The map follows the 14 x 14 token grid: constant-ish within a 16-pixel patch, varying across patches.
    per_patch = heat.reshape(14, 16, 14, 16).mean(axis=(1, 3))
    assert per_patch.std() > 0.01
