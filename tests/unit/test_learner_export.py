"""learner.core.export: the exported TorchScript and ONNX networks give the classifier's own predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from learner.core import export
from learner.core.backbone import create_backbone
from learner.core.classifier import Classifier, LinearHead
from learner.core.config import BackboneSpec
from learner.core.errors import LearnerError

SIZE = 32  # small: the networks are what is tested, not their accuracy
SPEC = BackboneSpec(name="mobilenetv3_small_050", weights="none", multiscale=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny networks: torch's thread pool costs more than it gives, most of all on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def head_classifier(tta: bool = False) -> Classifier:
    torch.manual_seed(0)
    backbone = create_backbone(SPEC)
    assert backbone.pooled_stages, "the test backbone pools stages, as the platform's does"
    head = LinearHead(backbone.num_features, 3)
    with torch.no_grad():
        head.mean.normal_()
        head.scale.uniform_(0.5, 2.0)
        head.linear.weight.normal_(std=0.5)
    return Classifier(
        mode="head",
        class_names=["a", "b", "c"],
        spec=SPEC,
        normalisation=backbone.normalisation,
        image_size=SIZE,
        network=head.eval(),
        weights_id=backbone.weights_id,
        tta=tta,
        _backbone=backbone,
    )


def finetuned_classifier() -> Classifier:
    torch.manual_seed(0)
    network = timm.create_model(SPEC.name, pretrained=False, num_classes=2).eval()
    backbone = create_backbone(SPEC)
    return Classifier(
        mode="finetune",
        class_names=["x", "y"],
        spec=BackboneSpec(name=SPEC.name, weights="none"),
        normalisation=backbone.normalisation,
        image_size=SIZE,
        network=network,
        weights_id="random",
    )


def pixels(classifier: Classifier, batch: list[Image.Image]) -> torch.Tensor:
    from learner.core.data import normalise, to_tensor

    return normalise(torch.stack([to_tensor(img, SIZE) for img in batch]), classifier.normalisation)


@pytest.mark.parametrize("make", [head_classifier, lambda: head_classifier(tta=True), finetuned_classifier])
def test_the_torchscript_network_predicts_what_the_classifier_predicts(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    classifier = make()
    path = tmp_path / export.TORCHSCRIPT_NAME
    assert export.save_torchscript(classifier, path) <= 1e-5
    traced = torch.jit.load(str(path), map_location="cpu")
    batch = images(5)  # not the batch size it was traced with
    with torch.no_grad():
        got = torch.softmax(traced(pixels(classifier, batch)), dim=1).numpy()
    want = classifier.predict_proba(batch, device="cpu")
    assert got.shape == (5, len(classifier.class_names))
    assert np.abs(got - want).max() < 1e-5
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_tta_is_part_of_the_exported_network() -> None:
    plain, tta = head_classifier(), head_classifier(tta=True)
    x = pixels(plain, images(2))
    with torch.no_grad():
        assert not torch.allclose(export.export_network(plain)(x), export.export_network(tta)(x), atol=1e-4)


def test_the_onnx_network_gives_logits_and_probabilities_for_any_batch(tmp_path: Path) -> None:
    import onnxruntime as ort

    classifier = head_classifier()
    path = tmp_path / export.ONNX_NAME
    assert export.save_onnx(classifier, path) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = images(7)
    logits, probabilities = session.run(["logits", "probabilities"], {"image": pixels(classifier, batch).numpy()})
    want = classifier.predict_proba(batch, device="cpu")
    assert logits.shape == probabilities.shape == (7, 3)
    assert np.abs(probabilities - want).max() < 1e-5
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-6)


def test_an_export_that_differs_from_the_model_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classifier = head_classifier()
    real_load = torch.jit.load

    class Off(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 0.5

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Off(real_load(*a, **k)))
    with pytest.raises(LearnerError, match="differs from the model"):
        export.save_torchscript(classifier, tmp_path / export.TORCHSCRIPT_NAME)
    assert list(tmp_path.iterdir()) == []


def test_the_wsinfer_config_names_the_geometry_classes_and_preprocessing() -> None:
    classifier = head_classifier()
    config = export.wsinfer_config(classifier, patch_size_pixels=224, spacing_um_px=0.5, description="d")
    assert config["spec_version"] == "1.0" and config["architecture"] == SPEC.name
    assert config["num_classes"] == 3 and config["class_names"] == ["a", "b", "c"]
    assert config["patch_size_pixels"] == 224 and config["spacing_um_px"] == 0.5
    resize, to_tensor, normalize = config["transform"]
    assert resize == {"name": "Resize", "arguments": {"size": SIZE}} and to_tensor == {"name": "ToTensor"}
    assert normalize["arguments"] == {
        "mean": list(classifier.normalisation.mean),
        "std": list(classifier.normalisation.std),
    }
    with pytest.raises(LearnerError, match="positive"):
        export.wsinfer_config(classifier, patch_size_pixels=224, spacing_um_px=0.0)
