"""CPU inference backends (ONNX Runtime, OpenVINO) against torch eager, and their cached exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learner.core import runtime
from learner.core.backbone import Backbone, create_backbone
from learner.core.config import BackboneSpec
from learner.core.data import LazyImages
from learner.core.embeddings import embed, embedding_model_id
from learner.core.errors import LearnerError

REPO = Path(__file__).resolve().parents[2]
LUNG = REPO.parent / "shared" / "data" / "lc25000_lung" / "lung_image_sets"
SIZE = 224  # what the platform feeds the default backbone


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    """The platform's default: packaged tf_efficientnet_lite0 weights, multiscale stage pooling (StagePooled)."""
    built = create_backbone(BackboneSpec(multiscale=True))
    assert built.pooled_stages, "the default backbone pools its last stages"
    return built


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    files = [sorted((LUNG / cls).glob("*.jpeg"))[k] for cls in ("lung_aca", "lung_n", "lung_scc") for k in (0, 7)]
    return [Image.open(f).convert("RGB") for f in files]


@pytest.fixture(autouse=True)
def fresh_sessions() -> None:
    runtime.forget_loaded()


@pytest.fixture(scope="module")
def eager(backbone: Backbone, images: list[Image.Image]) -> np.ndarray:
    return embed(backbone, images, image_size=SIZE, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def exported(backbone: Backbone, images: list[Image.Image], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runtime cache holding the default backbone's export (made once: exporting takes seconds)."""
    root = tmp_path_factory.mktemp("runtime")
    embed(backbone, images[:2], image_size=SIZE, device="cpu", backend="onnxruntime", runtime_cache=root)
    return root


@pytest.fixture
def cache_dir(exported: Path, tmp_path: Path) -> Path:
    shutil.copytree(exported, tmp_path / "runtime")
    return tmp_path / "runtime"


class CountingExports:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = runtime.ExportCache.export

        def export(cache: runtime.ExportCache, *args: object) -> None:
            self.count += 1
            original(cache, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(runtime.ExportCache, "export", export)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_embeddings_equal_eager_within_tolerance(
    backend: str, backbone: Backbone, images: list[Image.Image], eager: np.ndarray, cache_dir: Path
) -> None:
    tmp_path = cache_dir
    got = embed(backbone, images, image_size=SIZE, batch_size=4, device="cpu", backend=backend, runtime_cache=tmp_path)
    assert got.shape == eager.shape == (len(images), backbone.num_features)
    assert np.abs(got - eager).max() <= runtime.EMBED_ATOL
    # The multiscale columns (appended after the final features) came along with the export.
    assert np.abs(got[:, -200:]).max() > 0.01
    record = json.loads((tmp_path / embedding_model_id(backbone, SIZE, False) / "model.json").read_text())
    assert record["parameters"] == runtime.parameters_digest(backbone.model)


def test_auto_is_an_exported_backend_on_the_cpu_and_torch_on_a_gpu() -> None:
    assert runtime.resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    assert runtime.resolve_backend("onnxruntime", torch.device("cuda")) == "torch"
    with pytest.raises(LearnerError, match="Unknown CPU inference backend"):
        runtime.resolve_backend("tensorrt", torch.device("cpu"))


def test_export_is_reused_from_the_cache(
    backbone: Backbone, images: list[Image.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports = CountingExports(monkeypatch)
    first = embed(backbone, images, image_size=SIZE, device="cpu", backend="onnxruntime", runtime_cache=tmp_path)
    onnx_file = tmp_path / embedding_model_id(backbone, SIZE, False) / "model.onnx"
    written = onnx_file.stat().st_mtime_ns
    runtime.forget_loaded()  # as a new worker process would: load from disk, not from memory
    again = embed(backbone, images, image_size=SIZE, device="cpu", backend="openvino", runtime_cache=tmp_path)
    assert exports.count == 1
    assert onnx_file.stat().st_mtime_ns == written
    assert np.abs(first - again).max() <= 2 * runtime.EMBED_ATOL


@pytest.mark.parametrize("damage", ["truncate", "delete", "record", "garbage"])
def test_a_corrupt_or_missing_export_is_rebuilt(
    damage: str,
    backbone: Backbone,
    images: list[Image.Image],
    eager: np.ndarray,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp_path = cache_dir
    exports = CountingExports(monkeypatch)
    cache = runtime.ExportCache(tmp_path, embedding_model_id(backbone, SIZE, False))
    if damage == "truncate":
        cache.onnx_path.write_bytes(cache.onnx_path.read_bytes()[:4096])
    elif damage == "delete":
        cache.onnx_path.unlink()
    elif damage == "record":
        cache.record_path.write_text("{not json")
    else:  # bytes that hash as recorded but are no ONNX model: the loader fails, the export is rebuilt once
        cache.onnx_path.write_bytes(b"not an onnx model")
        record = json.loads(cache.record_path.read_text())
        record["sha256"] = runtime._sha256(cache.onnx_path)
        cache.record_path.write_text(json.dumps(record))
    runtime.forget_loaded()
    got = embed(
        backbone, images, image_size=SIZE, batch_size=3, device="cpu", backend="onnxruntime", runtime_cache=tmp_path
    )
    assert exports.count == 1
    assert np.abs(got - eager).max() <= runtime.EMBED_ATOL
    assert cache.valid(runtime.parameters_digest(backbone.model))


def test_other_weights_under_the_same_model_id_rebuild_the_export(
    images: list[Image.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports = CountingExports(monkeypatch)
    spec = BackboneSpec(weights="none", multiscale=True)
    outputs = []
    for seed in (1, 2):  # random weights: the same id ("random") for different parameters
        torch.manual_seed(seed)
        net = create_backbone(spec)
        want = embed(net, images[:3], image_size=SIZE, device="cpu")
        got = embed(net, images[:3], image_size=SIZE, device="cpu", backend="onnxruntime", runtime_cache=tmp_path)
        assert np.abs(got - want).max() <= runtime.EMBED_ATOL
        outputs.append(got)
    assert exports.count == 2
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3


def test_a_runtime_outside_the_tolerance_is_never_used(
    backbone: Backbone, images: list[Image.Image], eager: np.ndarray, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = cache_dir
    real = runtime._LOADERS["onnxruntime"]

    def drifting(path: Path):  # type: ignore[no-untyped-def]
        run = real(path)
        return lambda x: run(x) + 10 * runtime.EMBED_ATOL

    monkeypatch.setitem(runtime._LOADERS, "onnxruntime", drifting)
    with pytest.raises(LearnerError, match="differs from torch"):
        embed(backbone, images, image_size=SIZE, device="cpu", backend="onnxruntime", runtime_cache=tmp_path)
    # auto: falls back to torch, so what reaches the store is eager's embedding.
    got = embed(backbone, images, image_size=SIZE, batch_size=3, device="cpu", backend="auto", runtime_cache=tmp_path)
    np.testing.assert_array_equal(got, eager)


def test_rows_come_back_in_the_requested_order_when_read_in_locality_order(
    backbone: Backbone, images: list[Image.Image], eager: np.ndarray
) -> None:
    reads: list[int] = []

    def load(i: int) -> Image.Image:
        reads.append(i)
        return images[i]

    reversed_source = LazyImages(load, len(images), locality=lambda i: -i)
    got = embed(backbone, reversed_source, image_size=SIZE, batch_size=3, device="cpu")
    assert reads == list(range(len(images)))[::-1]
    assert np.abs(got - eager).max() <= runtime.EMBED_ATOL
