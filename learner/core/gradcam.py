"""Grad-CAM heatmap for one image (pytorch-grad-cam), for either classifier mode."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from learner.core.classifier import Classifier
from learner.core.data import normalise, to_tensor
from learner.core.errors import LearnerError


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last Conv2d in registration order: for timm CNNs the final feature map before pooling."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise LearnerError("Grad-CAM needs a convolutional backbone; this model has no Conv2d layer.")
    return convs[-1]


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
    target_layer = layer if layer is not None else last_conv_layer(module)
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():  # gradients must flow back to the target layer
        p.requires_grad_(True)
    try:
        with GradCAM(model=module, target_layers=[target_layer]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)])[0]
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return np.asarray(heat, dtype=np.float32), target_class
