"""A trained classifier as files other programs run: TorchScript for WSInfer (and QuPath's WSInfer extension)
and ONNX, each one network from normalised pixels to class logits, backbone and head together.

Why one network: in head mode the platform keeps the backbone and the linear head apart (embeddings are
cached, the head is refitted in seconds), but a client has neither the store nor the platform's code. So
the export chains the backbone exactly as rounds embed with it (multiscale stage pooling, dihedral TTA when
the model was trained on it) with the head, or takes the fine-tuned network as it is.

Why logits: WSInfer applies the softmax itself (``wsinfer.modellib.run_inference``: softmax over dim 1 when
there are several classes), as does QuPath's extension; a network that returned probabilities would be
softmaxed twice. The ONNX file gives both, ``logits`` and ``probabilities``, for clients that do not.

Every export is checked against the classifier in eager torch before it is kept (``EXPORT_RTOL``), so a
graph that traced wrongly never reaches a user.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.core.classifier import Classifier, LinearHead
from learner.core.data import dihedral
from learner.core.embeddings import pooled_features
from learner.core.errors import LearnerError

# Largest difference from eager torch accepted, relative to the largest logit (at least 1): float32
# reassociation in a traced graph or ONNX Runtime is ~1e-6 of that; a wrong graph differs by whole units.
EXPORT_RTOL = 1e-4
ONNX_OPSET = 17
WSINFER_SPEC_VERSION = "1.0"
TORCHSCRIPT_NAME = "torchscript_model.pt"  # the names wsinfer-zoo and QuPath's extension look for
CONFIG_NAME = "config.json"
ONNX_NAME = "model.onnx"
# Images of the check: a fixed random batch (deterministic, so a rebuilt export is checked the same way).
CHECK_IMAGES = 3


class PixelsToLogits(nn.Module):
    """Normalised NCHW pixels -> logits, the way the platform scores a patch with this classifier."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.tta = bool(classifier.tta and classifier.mode == "head")
        if classifier.mode == "head":
            assert isinstance(classifier.network, LinearHead)
            self.body: nn.Module = classifier.backbone().model
            self.head: nn.Module = classifier.network
        else:
            self.body = classifier.network
            self.head = nn.Identity()
        self.mode = classifier.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "head":
            return self.body(x)
        if self.tta:  # the embedding is the mean over the 8 dihedral transforms (embeddings.forward_batches)
            features = torch.stack([pooled_features(self.body, dihedral(x, k)) for k in range(8)]).mean(0)
        else:
            features = pooled_features(self.body, x)
        return self.head(features)


class _LogitsAndProbabilities(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=1)


def export_network(classifier: Classifier) -> PixelsToLogits:
    net = PixelsToLogits(classifier).cpu()
    net.eval()
    return net


def check_batch(classifier: Classifier, n: int = CHECK_IMAGES) -> torch.Tensor:
    """A fixed batch of normalised random images at the classifier's input size."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, classifier.image_size, classifier.image_size, generator=generator)
    mean = torch.tensor(classifier.normalisation.mean).view(1, 3, 1, 1)
    std = torch.tensor(classifier.normalisation.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _check(name: str, want: np.ndarray, got: np.ndarray) -> float:
    """The largest difference of ``got`` from eager's ``want``; raises when it is more than EXPORT_RTOL allows."""
    if got.shape != want.shape:
        raise LearnerError(f"The {name} export gives outputs of shape {got.shape}, not {want.shape}.")
    diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))
    allowed = EXPORT_RTOL * max(1.0, float(np.max(np.abs(want))))
    if not diff <= allowed:
        raise LearnerError(f"The {name} export differs from the model by {diff:.3g} (more than {allowed:.3g}).")
    return diff


def _temporary(folder: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    return Path(tmp)


def save_torchscript(classifier: Classifier, path: Path) -> float:
    """Trace the classifier to TorchScript at ``path`` (atomically); returns its largest difference from eager.

    Traced, not scripted: the multiscale wrapper collects stage outputs with forward hooks, which scripting
    does not support; a trace records the operations they ran. Nothing in these networks depends on the
    batch size, so the trace of a batch of two serves any batch (the check runs three)."""
    net = export_network(classifier)
    example = check_batch(classifier, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path.parent, ".pt.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notices about Python values it records as constants
            traced = torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(traced, str(tmp))
            batch = check_batch(classifier)
            want = net(batch).numpy()
            got = torch.jit.load(str(tmp), map_location="cpu")(batch).numpy()
        diff = _check("TorchScript", want, got)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def save_onnx(classifier: Classifier, path: Path) -> float:
    """Export the classifier to ONNX at ``path`` (atomically): input ``image`` (N, 3, H, W), normalised;
    outputs ``logits`` and ``probabilities`` (N, classes); the batch axis is dynamic. Returns its largest
    difference from eager, run by ONNX Runtime."""
    import onnxruntime as ort

    net = _LogitsAndProbabilities(export_network(classifier)).eval()
    size = classifier.image_size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path.parent, ".onnx.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation notices
            torch.onnx.export(
                net,
                (torch.zeros(1, 3, size, size),),
                str(tmp),
                input_names=["image"],
                output_names=["logits", "probabilities"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
            batch = check_batch(classifier)
            want = net(batch)[0].numpy()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"image": batch.numpy()})[0]
        diff = _check("ONNX", want, got)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def wsinfer_config(
    classifier: Classifier, *, patch_size_pixels: int, spacing_um_px: float, description: str = ""
) -> dict[str, Any]:
    """``config.json`` in the wsinfer-zoo model schema (spec 1.0).

    WSInfer cuts ``patch_size_pixels * spacing_um_px`` micrometres of the slide's level 0 and hands that
    region to the transforms; ``Resize`` then brings it to the network's input size, as the platform resizes
    a patch's level-0 region to the project's patch size and that to the network's input. ``ToTensor`` +
    ``Normalize`` are the platform's own scaling to [0, 1] and the backbone's normalisation."""
    if patch_size_pixels < 1 or not spacing_um_px > 0:
        raise LearnerError("A WSInfer model needs a positive patch size and spacing.")
    config: dict[str, Any] = {
        "spec_version": WSINFER_SPEC_VERSION,
        "architecture": classifier.spec.name,
        "num_classes": len(classifier.class_names),
        "class_names": list(classifier.class_names),
        "patch_size_pixels": int(patch_size_pixels),
        "spacing_um_px": float(spacing_um_px),
        "transform": [
            {"name": "Resize", "arguments": {"size": int(classifier.image_size)}},
            {"name": "ToTensor"},
            {
                "name": "Normalize",
                "arguments": {
                    "mean": [float(v) for v in classifier.normalisation.mean],
                    "std": [float(v) for v in classifier.normalisation.std],
                },
            },
        ],
    }
    if description:
        config["description"] = description
    return config
