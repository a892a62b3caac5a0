"""The GPU worker's learner paths on a real GPU, in one short run (for a lent device machine):

    python tests/bench/bench_gpu.py [--data DIR] [--per-class 800] [--epochs 4] [--out DIR]

What the `gpu` Celery queue runs, without the platform around it (the device machine has no PostgreSQL or
Redis): ``learner.core`` embedding and fine-tune training, on real LC25000 patches (``--data``: the
``lc25000_lung`` folder, or a copy of part of it with its ``manifest.csv``), split 80/20 by ``group_id``.

1. forward and training throughput at 224 px (``bench_learner.throughput``): fp32 and bf16 autocast +
   channels_last on CUDA; the same fp32 figures on the CPU of the same machine, for the ratio;
2. ``embed`` (the default backbone, its packaged ImageNet weights, JPEG decoding included) on CUDA and on
   the CPU over the same images: img/s each, the ratio, and how far the GPU's bf16 vectors are from the
   CPU's fp32 ones (max abs and relative norm difference, cosine); then a logistic head trained on each
   (``train_head``) scored on the held-out groups: the same accuracy within noise or the GPU path is wrong;
3. ``finetune`` on CUDA (bf16 autocast, channels_last, the platform's default schedule and augmentation)
   on the training groups with validation on the held-out ones: seconds per epoch, img/s, the validation
   accuracy of each epoch and of the kept weights, against the head on frozen embeddings.

Every figure is printed; the last line is one JSON object. Exit status 1 if CUDA is not available.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from learner.core.backbone import create_backbone  # noqa: E402
from learner.core.config import BackboneSpec, TrainConfig  # noqa: E402
from learner.core.data import Reader, image_files  # noqa: E402
from learner.core.embeddings import PassTimings, embed  # noqa: E402
from learner.core.evaluation import evaluate  # noqa: E402
from learner.core.training import FinetuneResult, finetune, train_head  # noqa: E402
from tests.bench.bench_learner import throughput  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lc25000_lung"


def read_manifest(data: Path, per_class: int) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """The first ``per_class`` images of each class in manifest order (whole groups come together)."""
    with open(data / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if (data / r["path"]).is_file()]
    classes = sorted({r["label"] for r in rows})
    by_group = sorted(rows, key=lambda r: r["group_id"])
    picked = [r for c in classes for r in [r for r in by_group if r["label"] == c][:per_class]]
    paths = [str(data / r["path"]) for r in picked]
    labels = np.array([classes.index(r["label"]) for r in picked])
    groups = np.array([r["group_id"] for r in picked])
    return paths, labels, groups, classes


def grouped_split(groups: np.ndarray, labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """``fraction`` of each class's groups held out (a group never on both sides; every class on both)."""
    rng = np.random.default_rng(seed)
    test_groups: set[str] = set()
    for c in np.unique(labels):
        unique = np.unique(groups[labels == c])
        test_groups |= set(rng.choice(unique, size=max(1, round(fraction * len(unique))), replace=False).tolist())
    return np.array([g in test_groups for g in groups])


def embed_pass(paths: list[str], device: str, batch: int, reader: Reader) -> tuple[np.ndarray, float, PassTimings]:
    backbone = create_backbone()
    timings = PassTimings()
    t0 = time.perf_counter()
    emb = embed(backbone, image_files(paths), batch_size=batch, device=device, reader=reader, timings=timings)
    return emb, time.perf_counter() - t0, timings


def timed_finetune(
    paths: list[str],
    labels: np.ndarray,
    classes: list[str],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    epochs: int,
    batch: int,
    device: str,
    reader: Reader | None = None,
) -> tuple[FinetuneResult, float]:
    """``finetune`` on the training rows, validated on the held-out ones (one frozen epoch first), and its seconds."""
    config = TrainConfig(mode="finetune", epochs=epochs, frozen_epochs=1, batch_size=batch, device=device)
    t0 = time.perf_counter()
    result = finetune(
        BackboneSpec(),
        image_files([paths[i] for i in train_idx]),
        labels[train_idx],
        classes,
        config,
        val_images=image_files([paths[i] for i in val_idx]),
        val_labels=labels[val_idx],
        reader=reader,
    )
    return result, time.perf_counter() - t0


def readers(device: str) -> dict[str, Reader]:
    cores = os.cpu_count() or 2
    pin = device == "cuda"
    return {
        "serial": Reader(pin=pin),
        "threads-2": Reader(kind="threads", workers=2, pin=pin),
        f"threads-{min(8, cores)}": Reader(kind="threads", workers=min(8, cores), prefetch=4, pin=pin),
        f"processes-{min(8, cores)}": Reader(kind="processes", workers=min(8, cores), prefetch=4, pin=pin),
    }


def head_accuracy(emb: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: list[str]) -> dict[str, float]:
    clf = train_head(emb[~test], labels[~test], classes, create_backbone(), TrainConfig())
    metrics = evaluate(labels[test], clf.predict_proba(emb[test]), classes)
    return {"accuracy": float(metrics["accuracy"]), "balanced_accuracy": float(metrics["balanced_accuracy"])}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-class", type=int, default=800)
    parser.add_argument("--cpu-images", type=int, default=600, help="images embedded on the CPU for the comparison")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--reader-epochs", type=int, default=2, help="fine-tune epochs per reader (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run without a GPU (tiny sizes)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("CUDA is not available", file=sys.stderr)
        return 1
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(0) if gpu == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
    }
    print(json.dumps(report), flush=True)

    # 1. raw throughput
    if not args.no_throughput:
        report["throughput"] = throughput(gpu, 128, 20 if gpu == "cuda" else 1) + throughput("cpu", 32, 2)

    # 2. the embedding pass, GPU against CPU on the same images
    paths, labels, groups, classes = read_manifest(args.data, args.per_class)
    test = grouped_split(groups, labels)
    n_groups = len(np.unique(groups))
    print(f"data: {len(paths)} images, {n_groups} groups, {int(test.sum())} held out by group", flush=True)
    reader = Reader(kind="threads", workers=min(8, os.cpu_count() or 2), prefetch=4, pin=gpu == "cuda")
    embed_pass(paths[: args.batch], gpu, args.batch, reader)  # warm-up: weights, cudnn autotune
    emb_gpu, s_gpu, t_gpu = embed_pass(paths, gpu, args.batch, reader)
    n_cpu = min(args.cpu_images, len(paths))
    cpu_rows = np.random.default_rng(1).choice(len(paths), size=n_cpu, replace=False)
    emb_cpu, s_cpu, _ = embed_pass([paths[i] for i in cpu_rows], "cpu", 32, reader)
    a, b = emb_gpu[cpu_rows].astype(np.float64), emb_cpu.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    e: dict[str, Any] = {
        "images_gpu": len(paths),
        "gpu_img_s": len(paths) / s_gpu,
        "gpu_read_wait_s": t_gpu.read_wait_s,
        "gpu_forward_s": t_gpu.forward_s,
        "images_cpu": n_cpu,
        "cpu_img_s": n_cpu / s_cpu,
        "max_abs_diff": float(np.abs(a - b).max()),
        "rel_norm_diff": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "min_cosine": float(cos.min()),
        "finite": bool(np.isfinite(emb_gpu).all()),
    }
    e["gpu_over_cpu"] = e["gpu_img_s"] / e["cpu_img_s"]
    print(
        f"embed pass: GPU {e['gpu_img_s']:.1f} img/s over {len(paths)} (reader wait {t_gpu.read_wait_s:.1f}s, "
        f"forward {t_gpu.forward_s:.1f}s); CPU {e['cpu_img_s']:.1f} img/s over {n_cpu}; ratio "
        f"{e['gpu_over_cpu']:.1f}x; GPU bf16 vs CPU fp32: max abs {e['max_abs_diff']:.3g}, relative "
        f"{e['rel_norm_diff']:.3g}, min cosine {e['min_cosine']:.5f}",
        flush=True,
    )
    # the head on GPU vectors and on CPU vectors of the same images: they must agree
    sub_test = test[cpu_rows]
    if sub_test.any() and (~sub_test).any() and len(np.unique(labels[cpu_rows][~sub_test])) == len(classes):
        e["head_on_cpu_vectors"] = head_accuracy(emb_cpu, labels[cpu_rows], sub_test, classes)
        e["head_on_gpu_vectors_same_images"] = head_accuracy(emb_gpu[cpu_rows], labels[cpu_rows], sub_test, classes)
    e["head_on_gpu_vectors_all"] = head_accuracy(emb_gpu, labels, test, classes)
    print(f"head accuracy (held-out groups): {json.dumps({k: v for k, v in e.items() if k.startswith('head')})}")
    report["embed"] = e

    # 2b. the same pass with each patch reader: which one keeps the GPU fed
    e["readers"] = {}
    for name, r in readers(gpu).items():
        _, s_r, t_r = embed_pass(paths, gpu, args.batch, r)
        e["readers"][name] = {"img_s": len(paths) / s_r, "read_wait_s": t_r.read_wait_s, "forward_s": t_r.forward_s}
        print(
            f"  embed pass, reader {name:12s}: {len(paths) / s_r:7.1f} img/s (reader wait {t_r.read_wait_s:.1f}s, "
            f"forward {t_r.forward_s:.1f}s)",
            flush=True,
        )

    # 3. fine-tuning on the GPU
    train_idx, val_idx = np.flatnonzero(~test), np.flatnonzero(test)
    if args.reader_epochs:
        f_readers = {}
        for name, r in readers(gpu).items():
            res, sec = timed_finetune(
                paths, labels, classes, train_idx, val_idx, args.reader_epochs, args.batch, gpu, r
            )
            f_readers[name] = {"seconds": sec, "img_s": len(train_idx) * len(res.history) / sec}
            print(
                f"  finetune {len(res.history)} epochs, reader {name:12s}: {sec:.1f}s "
                f"({f_readers[name]['img_s']:.1f} img/s incl. validation)",
                flush=True,
            )
    result, seconds = timed_finetune(paths, labels, classes, train_idx, val_idx, args.epochs, args.batch, gpu)
    epochs = len(result.history)
    f: dict[str, Any] = {
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "epochs_run": epochs,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(1, epochs),
        "train_img_s": len(train_idx) * epochs / seconds,
        "best_epoch": result.best_epoch,
        "val_metrics": {k: v for k, v in (result.val_metrics or {}).items() if isinstance(v, (int, float))},
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu == "cuda" else None,
    }
    for h in f["history"]:
        print(f"  finetune epoch {json.dumps(h)}", flush=True)
    print(
        f"finetune on {gpu}: {epochs} epochs of {len(train_idx)} images in {seconds:.1f}s "
        f"({f['seconds_per_epoch']:.1f}s/epoch incl. validation, {f['train_img_s']:.1f} img/s); best epoch "
        f"{result.best_epoch}; val {json.dumps(f['val_metrics'])}",
        flush=True,
    )
    if args.reader_epochs:
        f["readers"] = f_readers
    report["finetune"] = f
    line = json.dumps(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.json").write_text(line)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
