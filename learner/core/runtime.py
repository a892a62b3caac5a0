"""Inference backends for embedding on the CPU: the backbone (``StagePooled`` wrapper included) exported
once to ONNX and run by ONNX Runtime or OpenVINO, or plain torch.

Why: on a 2-core CPU the default backbone runs ~4x faster under ONNX Runtime than in torch eager mode
(``tests/bench/bench_embed.py``), with embeddings equal to eager's within float32 rounding. Training
(fine-tune mode) and the GPU keep torch; only the no-grad embedding pass of a CPU worker changes.

Equal embeddings are what lets a runtime write into the same embedding store as torch: a vector must
not depend on which worker computed it. So an exported runtime is only used once it has been checked, in
this process, against torch eager on the first real batch it is given: the largest absolute difference
must be at most ``EMBED_ATOL``. A runtime that fails the check is never used (``auto`` falls back to
torch with a warning, an explicitly chosen backend raises), so the store key never needs to name the
runtime.

The ONNX file is cached on disk under ``<cache dir>/<embedding model id>/`` (backbone, weights id,
pooled stages, input size) beside a JSON record of its sha256 and a digest of the exported parameters;
a missing, corrupt or stale file (other weights under the same id, e.g. random ones) is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from learner.core.errors import LearnerError

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")
# What ``auto`` picks on the CPU, fastest first (bench_embed.py on 2 cores); the first installed one.
AUTO_ORDER: tuple[str, ...] = ("onnxruntime", "openvino")

# Largest absolute difference from torch eager accepted for a runtime to share the store. Measured on
# real patches with the packaged tf_efficientnet_lite0 (1,904 features, values up to ~10): ONNX Runtime
# 1.4e-5, OpenVINO 2e-5, both float32 reassociation; a wrong graph differs by whole units.
EMBED_ATOL = 1e-4
# Images of the first batch checked against eager (eager is the slow part of the check).
CHECK_IMAGES = 4
ONNX_OPSET = 17
EXPORT_FORMAT = 1

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Runtime:
    """A batch forward pass: normalised NCHW float32 in, pooled features out (torch tensors on `device`)."""

    name: str
    forward: Forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def installed(backend: str) -> bool:
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(backend)
    return module is None or importlib.util.find_spec(module) is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend actually used: torch on any non-CPU device; ``auto`` is the fastest one installed."""
    if backend not in BACKENDS:
        raise LearnerError(f"Unknown CPU inference backend '{backend}'. Use one of {', '.join(BACKENDS)}.")
    if device.type != "cpu":
        return "torch"
    if backend == "auto":
        return next((b for b in AUTO_ORDER if installed(b)), "torch")
    if not installed(backend):
        raise LearnerError(f"The CPU backend '{backend}' is not installed; pip install -r requirements.txt.")
    return backend


def parameters_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer, so an export is never reused for other weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportCache:
    """``root/<model id>/model.onnx`` and its record ``model.json``."""

    root: Path
    model_id: str

    @property
    def onnx_path(self) -> Path:
        return self.root / self.model_id / "model.onnx"

    @property
    def record_path(self) -> Path:
        return self.root / self.model_id / "model.json"

    def valid(self, params: str) -> bool:
        """True when the ONNX file is there, whole (its sha256 matches the record) and of these weights."""
        try:
            record = json.loads(self.record_path.read_text())
            return (
                isinstance(record, dict)
                and record.get("format") == EXPORT_FORMAT
                and record.get("parameters") == params
                and record.get("sha256") == _sha256(self.onnx_path)
            )
        except (OSError, ValueError):
            return False

    def export(self, model: nn.Module, image_size: int, params: str) -> None:
        """Export ``model`` (the whole wrapper: multiscale pooling included), batch axis dynamic."""
        folder = self.onnx_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.tmp")
        os.close(fd)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript-exporter deprecation notices
                torch.onnx.export(
                    model.cpu(),
                    (torch.zeros(1, 3, image_size, image_size),),
                    tmp,
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            record = {
                "format": EXPORT_FORMAT,
                "model_id": self.model_id,
                "parameters": params,
                "sha256": _sha256(Path(tmp)),
                "image_size": image_size,
                "opset": ONNX_OPSET,
                "torch": torch.__version__,
            }
            os.replace(tmp, self.onnx_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            model.train(was_training)
        _write_atomic(self.record_path, json.dumps(record, indent=1))


def _write_atomic(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _onnxruntime_session(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, session.run(["features"], {"pixels": x})[0])

    return run


def _openvino_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {"INFERENCE_NUM_THREADS": _threads(), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: calls from several threads take turns

    def run(x: np.ndarray) -> np.ndarray:
        with lock:
            return np.array(request.infer({0: x})[compiled.output(0)], copy=True)

    return run


_LOADERS: dict[str, Callable[[Path], Callable[[np.ndarray], np.ndarray]]] = {
    "onnxruntime": _onnxruntime_session,
    "openvino": _openvino_model,
}
# Sessions loaded and checked against eager in this process: (backend, model id, parameters) -> run. A
# pass embeds chunk by chunk (one ``embed`` call each); this keeps that from reloading and rechecking.
_checked: dict[tuple[str, str, str], Callable[[np.ndarray], np.ndarray]] = {}
_checked_lock = threading.Lock()


def _load(backend: str, cache: ExportCache, model: nn.Module, image_size: int, params: str) -> Any:
    """The backend's session over the cached export, building (or rebuilding) the export when needed."""
    if not cache.valid(params):
        cache.export(model, image_size, params)
    try:
        return _LOADERS[backend](cache.onnx_path)
    except Exception as exc:  # a file that hashes right yet will not load: rebuild it once
        logger.warning("Rebuilding the %s export %s: %s", backend, cache.onnx_path, exc)
        cache.export(model, image_size, params)
        return _LOADERS[backend](cache.onnx_path)


def forget_loaded() -> None:
    """Drop the sessions this process has loaded (tests; a changed cache directory)."""
    with _checked_lock:
        _checked.clear()


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0


def exported_runtime(
    backend: str,
    model: nn.Module,
    *,
    model_id: str,
    image_size: int,
    cache_dir: Path,
    fallback: bool,
) -> Runtime:
    """``model`` run by ``backend`` from its cached ONNX export, checked against eager on the first batch.

    The export and the check happen on the first call (they need that batch). With ``fallback`` a runtime
    that cannot be built or differs by more than ``EMBED_ATOL`` is replaced by eager torch with a warning;
    without, that raises a LearnerError.
    """
    eager = torch_runtime(model, torch.device("cpu"))
    state: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def first(x: torch.Tensor) -> torch.Tensor:
        params = parameters_digest(model)
        key = (backend, str(cache_dir / model_id), params)
        try:
            with _checked_lock:
                run = _checked.get(key)
                if run is None:
                    run = _load(backend, ExportCache(cache_dir, model_id), model, image_size, params)
                    probe = x[:CHECK_IMAGES].contiguous()
                    want = eager(probe).numpy()
                    got = run(probe.numpy())
                    diff = max_abs_difference(want, got) if got.shape == want.shape else float("inf")
                    if diff > EMBED_ATOL:
                        raise LearnerError(
                            f"The {backend} export of {model_id} differs from torch by {diff:.2g} "
                            f"(more than the {EMBED_ATOL:g} allowed); its embeddings would not match the store."
                        )
                    logger.info("Embedding with %s (max abs difference from torch %.2g)", backend, diff)
                    _checked[key] = run
        except Exception as exc:
            if not fallback:
                if isinstance(exc, LearnerError):
                    raise
                raise LearnerError(f"The {backend} backend could not run {model_id}: {exc}") from exc
            logger.warning("Embedding with torch instead of %s: %s", backend, exc)
            state["forward"] = eager
            return eager(x)
        checked = run
        state["forward"] = lambda batch: torch.from_numpy(checked(batch.contiguous().numpy()))
        return state["forward"](x)

    def forward(x: torch.Tensor) -> torch.Tensor:
        step = state.get("forward", first)
        return step(x)

    return Runtime(backend, forward)


def torch_runtime(model: nn.Module, device: torch.device) -> Runtime:
    """Plain torch: the model as it is (already on `device`, in eval mode), pooled features."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]

    return Runtime("torch", forward)


def select_runtime(
    model: nn.Module,
    device: torch.device,
    *,
    backend: str,
    model_id: str,
    image_size: int,
    cache_dir: Path | None,
) -> Runtime:
    """The runtime an embedding pass uses: torch unless on the CPU with an export cache and another backend."""
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        return torch_runtime(model, device)
    if cache_dir is None:
        if backend == "auto":
            return torch_runtime(model, device)
        raise LearnerError(f"The {chosen} backend needs a directory to cache its exported model in.")
    return exported_runtime(
        chosen, model, model_id=model_id, image_size=image_size, cache_dir=cache_dir, fallback=backend == "auto"
    )
