"""Batch embedding extraction with an on-disk .npy cache and optional dihedral test-time augmentation."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from learner.core.backbone import Backbone, Normalisation
from learner.core.data import (
    ImageSource,
    Reader,
    StainNormaliser,
    as_source,
    dihedral,
    normalise,
    read_batches,
    read_order,
)
from learner.core.errors import LearnerError, ProgressFn, StopFn, check_stop, report
from learner.core.runtime import select_runtime


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; plain fp32 on CPU (CPU autocast is slower than fp32 for these convnets)."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                yield
        else:
            yield


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def to_device(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if device.type == "cuda" and channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits pooled features of any timm classifier (works with or without its classifier head)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


@dataclass(frozen=True)
class EmbeddingCache:
    """One float32 .npy per (model id, item key) under `root/<model id>/<xx>/<sha1(key)>.npy`.

    Per-item files make a cancelled pass resumable and let pools grow without rewriting anything.
    """

    root: Path

    def path(self, model_id: str, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / model_id / digest[:2] / f"{digest}.npy"

    def get(self, model_id: str, key: str) -> np.ndarray | None:
        try:
            return np.load(self.path(model_id, key))
        except (FileNotFoundError, ValueError, EOFError):
            return None

    def put(self, model_id: str, key: str, vector: np.ndarray) -> None:
        target = self.path(model_id, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.asarray(vector, dtype=np.float32))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def embedding_model_id(backbone: Backbone, image_size: int, tta: bool, cache_tag: str = "") -> str:
    parts = [backbone.cache_id, f"{image_size}px"]
    if tta:
        parts.append("tta8")
    if cache_tag:
        parts.append(cache_tag)
    return "-".join(parts)


@dataclass
class PassTimings:
    """Where an embedding pass spent its wall time: waiting for the reader's next batch, in the forward
    pass (including the copy to the device and back) and handing rows on (the store). Summed over calls."""

    read_wait_s: float = 0.0
    forward_s: float = 0.0
    store_s: float = 0.0
    images: int = 0
    batch_s: list[float] = field(default_factory=list)  # wall time of each batch, reader wait included

    def split(self) -> dict[str, float]:
        total = self.read_wait_s + self.forward_s + self.store_s
        return {
            "images": self.images,
            "read_wait_s": round(self.read_wait_s, 3),
            "forward_s": round(self.forward_s, 3),
            "store_s": round(self.store_s, 3),
            "forward_share": round(self.forward_s / total, 3) if total else 0.0,
        }


def forward_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: ImageSource,
    indices: Sequence[int],
    *,
    image_size: int,
    normalisation: Normalisation,
    batch_size: int,
    device: torch.device,
    tta: bool = False,
    stain: StainNormaliser | None = None,
    stage: str = "embed",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    on_batch: Callable[[Sequence[int], np.ndarray], None] | None = None,
    reader: Reader | None = None,
    timings: PassTimings | None = None,
) -> np.ndarray:
    """Run `fn` (already in eval mode) over `images[indices]` in batches; returns float32 rows in `indices` order.

    `reader` decodes the batches (serially by default; in threads or processes ahead of the forward pass)."""
    outputs: list[np.ndarray] = []
    total = max(1, len(indices))
    chunks = [list(indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]
    batches = read_batches(images, chunks, image_size, stain, reader)
    timings = timings if timings is not None else PassTimings()
    done = 0
    try:
        for chunk in chunks:
            check_stop(should_stop, stage)
            started = time.perf_counter()
            loaded = next(batches)
            fed = time.perf_counter()
            x = to_device(normalise(loaded, normalisation), device)
            with inference_context(device):
                if tta:
                    out = torch.stack([fn(dihedral(x, k)).float() for k in range(8)]).mean(0)
                else:
                    out = fn(x).float()
            rows = out.cpu().numpy().astype(np.float32)
            computed = time.perf_counter()
            if on_batch is not None:
                on_batch(chunk, rows)
            outputs.append(rows)
            done += len(chunk)
            report(progress, stage, done / total)
            timings.read_wait_s += fed - started
            timings.forward_s += computed - fed
            timings.store_s += time.perf_counter() - computed
            timings.images += len(chunk)
            timings.batch_s.append(time.perf_counter() - started)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops a reader's workers when the pass ends early
    check_stop(should_stop, stage)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def embed(
    backbone: Backbone,
    images: ImageSource | Sequence,
    *,
    keys: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    tta: bool = False,
    stain: StainNormaliser | None = None,
    cache_tag: str = "",
    device: str = "auto",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    backend: str = "torch",
    runtime_cache: str | Path | None = None,
    reader: Reader | None = None,
    timings: PassTimings | None = None,
) -> np.ndarray:
    """Embeddings (N, num_features) float32 for every image, computing only those not in the cache.

    With `cache_dir`, each item needs a stable `keys[i]` (e.g. "slide-12/x-4096/y-2048/224"); the
    cache is further keyed by backbone, weights id, image size, TTA and `cache_tag`, which must name
    anything else that changes pixels (e.g. the stain normalisation target). `tta` averages the
    embeddings of the 8 dihedral transforms (8x the compute).

    `backend` ("torch", "onnxruntime", "openvino" or "auto", see ``learner.core.runtime``) runs the forward
    pass on the CPU from an export cached under `runtime_cache`; any device other than the CPU uses torch.
    Images are read in the source's locality order (``LazyImages.locality``) by `reader`.
    """
    source = as_source(images)
    n = len(source)
    if cache_dir is not None and keys is None:
        raise LearnerError("Caching embeddings needs a key per image (keys=...).")
    if keys is not None and len(keys) != n:
        raise LearnerError(f"Got {len(keys)} keys for {n} images; give exactly one key per image.")
    if cache_dir is not None and stain is not None and not cache_tag:
        raise LearnerError("Stain-normalised embeddings need a cache_tag naming the normalisation target.")

    cache = EmbeddingCache(Path(cache_dir)) if cache_dir is not None else None
    model_id = embedding_model_id(backbone, image_size, tta, cache_tag)
    result = np.zeros((n, backbone.num_features), dtype=np.float32)
    todo: list[int] = []
    if cache is not None and keys is not None:
        for i, key in enumerate(keys):
            hit = cache.get(model_id, key)
            if hit is not None and hit.shape == (backbone.num_features,):
                result[i] = hit
            else:
                todo.append(i)
            if i % 1000 == 999:
                check_stop(should_stop, "embed")
    else:
        todo = list(range(n))
    report(progress, "embed", (n - len(todo)) / max(1, n))
    if not todo:
        return result

    dev = resolve_device(device)
    model = prepare_model(backbone.model, dev)
    model.eval()
    runtime = select_runtime(
        model,
        dev,
        backend=backend,
        model_id=embedding_model_id(backbone, image_size, False),
        image_size=image_size,
        cache_dir=Path(runtime_cache) if runtime_cache is not None else None,
    )
    todo = read_order(source, todo)

    def store(chunk: Sequence[int], rows: np.ndarray) -> None:
        result[list(chunk)] = rows
        if cache is not None and keys is not None:
            for i, row in zip(chunk, rows, strict=True):
                cache.put(model_id, keys[i], row)

    done_before = n - len(todo)

    def scaled(stage: str, fraction: float) -> None:
        report(progress, stage, (done_before + fraction * len(todo)) / max(1, n))

    forward_batches(
        runtime,
        source,
        todo,
        image_size=image_size,
        normalisation=backbone.normalisation,
        batch_size=batch_size,
        device=dev,
        tta=tta,
        stain=stain,
        stage="embed",
        progress=scaled if progress is not None else None,
        should_stop=should_stop,
        on_batch=store,
        reader=reader,
        timings=timings,
    )
    return result
