"""Grad-CAM heatmap for one image (pytorch-grad-cam), for either classifier mode and either kind of backbone.

A CNN is explained at its last convolution's feature map. A vision transformer (timm's ViTs: UNI, Virchow,
Phikon, DINOv2 ...) has one convolution only, the patch embedding, whose map says nothing about the
decision; it is explained at the input of its last block's attention (``blocks[-1].norm1``), its patch
tokens laid back on their grid with the class and register tokens dropped: the reshape pytorch-grad-cam
documents for ViTs."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from learner.core.classifier import Classifier
from learner.core.data import normalise, to_tensor
from learner.core.errors import LearnerError

Reshape = Callable[[torch.Tensor], torch.Tensor]


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last Conv2d in registration order: for timm CNNs the final feature map before pooling."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise LearnerError("Grad-CAM needs a convolutional backbone; this model has no Conv2d layer.")
    return convs[-1]


def vision_transformer(model: nn.Module) -> nn.Module | None:
    """The timm VisionTransformer inside ``model`` (a bare one, or one under a head), else None."""
    for m in model.modules():
        if hasattr(m, "blocks") and hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens"):
            return m
    return None


def token_grid(prefix_tokens: int) -> Reshape:
    """(batch, tokens, channels) -> (batch, channels, h, w) over the patch tokens, the first
    ``prefix_tokens`` (class, registers) dropped; a square grid, as timm's ViTs cut a square input."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 4:  # a ViT that keeps its tokens as NHWC
            return tokens.permute(0, 3, 1, 2)
        patches = tokens[:, prefix_tokens:, :]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise LearnerError(f"Grad-CAM expects a square grid of patch tokens, got {patches.shape[1]}.")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def cam_target(model: nn.Module) -> tuple[nn.Module, Reshape | None]:
    """The layer Grad-CAM reads (and how its output becomes a feature map) for this network."""
    vit = vision_transformer(model)
    if vit is not None and len(vit.blocks) and hasattr(vit.blocks[-1], "norm1"):  # type: ignore[arg-type,index]
        return vit.blocks[-1].norm1, token_grid(int(vit.num_prefix_tokens))  # type: ignore[index,union-attr,arg-type]
    return last_conv_layer(model), None


def grad_cam(
    classifier: Classifier,
    image: Image.Image,
    target_class: int | None = None,
    layer: nn.Module | None = None,
) -> tuple[np.ndarray, int]:
    """Heatmap (image_size x image_size, float32 in [0, 1]) of where the evidence for `target_class`
    (default: the predicted class) lies, and the class explained. Runs on CPU; one image takes a second or so."""
    if target_class is not None and not 0 <= target_class < len(classifier.class_names):
        raise LearnerError(f"target_class must be 0..{len(classifier.class_names) - 1}, got {target_class}.")
    module = classifier.torch_module().cpu().eval()
    x = normalise(to_tensor(image, classifier.image_size).unsqueeze(0), classifier.normalisation)
    if target_class is None:
        with torch.no_grad():
            target_class = int(module(x).argmax(dim=1).item())
    target_layer, reshape = (layer, None) if layer is not None else cam_target(module)
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():  # gradients must flow back to the target layer
        p.requires_grad_(True)
    try:
        with GradCAM(model=module, target_layers=[target_layer], reshape_transform=reshape) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)])[0]
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return np.asarray(heat, dtype=np.float32), target_class
