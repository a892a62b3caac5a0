"""Learner core benchmark (standalone): .venv/bin/python tests/bench/bench_learner.py [--quick] [--device cuda]."""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from learner.core.backbone import create_backbone, create_model  # noqa: E402
from learner.core.config import TrainConfig  # noqa: E402
from learner.core.data import image_files  # noqa: E402
from learner.core.embeddings import EmbeddingCache, embed, embedding_model_id  # noqa: E402
from learner.core.evaluation import evaluate  # noqa: E402
from learner.core.strategies import cold_start, select_batch  # noqa: E402
from learner.core.training import train_head  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lc25000_lung"
CACHE = REPO / "var" / "cache" / "bench"


def read_manifest() -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    with open(DATA / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    paths = [str(DATA / r["path"]) for r in rows]
    labels = np.array([classes.index(r["label"]) for r in rows])
    groups = np.array([r["group_id"] for r in rows])
    return paths, labels, groups, classes


def pool_embeddings(paths: list[str], tta: bool = False, batch_size: int = 32) -> tuple[np.ndarray, float]:
    backbone = create_backbone()
    keys = [str(Path(p).relative_to(DATA)) for p in paths]
    t0 = time.perf_counter()
    last = [0.0]

    def progress(stage: str, fraction: float) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {stage} {fraction:.1%} after {time.perf_counter() - t0:.0f}s", flush=True)

    # a fixed shuffled order, so that a pass stopped half-way leaves a random half of the pool cached
    order = np.random.default_rng(0).permutation(len(paths))
    emb = embed(
        backbone,
        image_files([paths[i] for i in order]),
        keys=[keys[i] for i in order],
        cache_dir=CACHE,
        batch_size=batch_size,
        tta=tta,
        progress=progress,
    )
    out = np.empty_like(emb)
    out[order] = emb
    return out, time.perf_counter() - t0


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _autocast(amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _embed_rate(model: torch.nn.Module, x: torch.Tensor, amp: bool, steps: int) -> float:
    model.eval()
    with torch.inference_mode(), _autocast(amp):
        model(x)
        _sync(x.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        _sync(x.device)
    return steps * len(x) / (time.perf_counter() - t0)


def _train_rate(model: torch.nn.Module, x: torch.Tensor, amp: bool, steps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 3, (len(x),), device=x.device)
    t0 = 0.0
    for step in range(steps + 1):  # the first step warms up (allocations, cudnn autotune)
        if step == 1:
            _sync(x.device)
            t0 = time.perf_counter()
        with _autocast(amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(x.device)
    return steps * len(x) / (time.perf_counter() - t0)


def throughput(device: str, batch: int, steps: int) -> list[dict[str, Any]]:
    """Images/s for embedding and fine-tune training at 224 px: fp32; on CUDA also bf16 AMP + channels_last.
    Printed, and returned as one row per variant."""
    dev = torch.device(device)
    variants = [("fp32", False)] + ([("amp-bf16+channels_last", True)] if dev.type == "cuda" else [])
    rows: list[dict[str, Any]] = []
    for name, fast in variants:
        model = create_model(num_classes=3).model.to(dev)
        x = torch.randn(batch, 3, 224, 224, device=dev)
        if fast:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            x = x.contiguous(memory_format=torch.channels_last)
        infer = _embed_rate(model, x, fast, steps)
        train = _train_rate(model, x, fast, steps)
        print(f"throughput {device} {name} (224 px, batch {batch}): embed {infer:.1f} img/s, train {train:.1f} img/s")
        rows.append({"device": device, "variant": name, "batch": batch, "embed_img_s": infer, "train_img_s": train})
    return rows


def cached_mask(paths: list[str], tta: bool = False) -> np.ndarray:
    backbone = create_backbone()
    model_id = embedding_model_id(backbone, 224, tta)
    cache = EmbeddingCache(CACHE)
    return np.array([cache.path(model_id, str(Path(p).relative_to(DATA))).is_file() for p in paths])


def grouped_test_split(groups: np.ndarray, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    test_groups = set(rng.choice(unique, size=round(fraction * len(unique)), replace=False).tolist())
    return np.array([g in test_groups for g in groups])


def round_timing(emb: np.ndarray, labels: np.ndarray, classes: list[str], n_labels: int, batch: int) -> None:
    """Labels -> new queue with cached embeddings: train head, score the rest, select with each strategy."""
    backbone = create_backbone()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(emb))
    lab, pool = order[:n_labels], order[n_labels:]
    clf, t_train = timed(train_head, emb[lab], labels[lab], classes, backbone, TrainConfig())
    proba, t_score = timed(clf.predict_proba, emb[pool])
    print(f"round: train head on {len(lab)} labels {t_train:.2f}s; score pool of {len(pool)} {t_score:.2f}s")
    for strategy in ("least_confidence", "margin", "entropy", "random", "diverse", "kcenter"):
        _, t = timed(
            select_batch, strategy, batch, proba=proba, embeddings=emb[pool], labelled_embeddings=emb[lab], rng=0
        )
        print(f"round: select {batch} by {strategy:16s} {t:.2f}s  (labels -> queue {t_train + t_score + t:.1f}s)")
    for method in ("kmeans", "kcenter"):
        _, t = timed(cold_start, emb, batch, method=method, rng=0)
        print(f"cold start {method} {batch} of {len(emb)}: {t:.2f}s")


def learning_curve(
    emb: np.ndarray,
    labels: np.ndarray,
    test: np.ndarray,
    classes: list[str],
    budgets: list[int],
    seeds: int,
    head_c: float = TrainConfig().head_c,
) -> dict[int, float]:
    backbone = create_backbone()
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    out: dict[int, float] = {}
    for budget in [*budgets, len(train_idx)]:
        if budget > len(train_idx):
            continue
        accs = []
        for seed in range(seeds if budget < len(train_idx) else 1):
            pick = np.random.default_rng(seed).choice(train_idx, size=budget, replace=False)
            clf = train_head(emb[pick], labels[pick], classes, backbone, TrainConfig(seed=seed, head_c=head_c))
            accs.append(evaluate(labels[test_idx], clf.predict_proba(emb[test_idx]), classes)["accuracy"])
        out[budget] = float(np.mean(accs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the full pool pass; use what is cached")
    parser.add_argument("--embed-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta-only", action="store_true", help="only the plain-vs-TTA comparison")
    parser.add_argument("--no-tta", action="store_true", help="skip the plain-vs-TTA comparison")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--tta-subset", type=int, default=600, help="images in the TTA comparison (8x compute)")
    args = parser.parse_args()
    torch.manual_seed(0)
    paths, labels, groups, classes = read_manifest()
    if args.tta_only:
        tta_experiment(paths, labels, groups, classes, args.tta_subset)
        return

    if not (args.embed_only or args.no_throughput):
        throughput(args.device, batch=32, steps=1 if args.quick and args.device == "cpu" else 3)

    have = cached_mask(paths)
    if args.quick:
        print(f"pool embedding: skipped (--quick); {have.sum()} of {len(paths)} already cached")
        idx = np.flatnonzero(have)
        emb, _ = pool_embeddings([paths[i] for i in idx])
    else:
        emb_all, seconds = pool_embeddings(paths)
        computed = int((~have).sum())
        rate = f"{computed / seconds:.1f} img/s" if computed else "all cached"
        print(f"pool embedding: {computed} computed + {int(have.sum())} cached in {seconds:.1f}s ({rate})")
        idx, emb = np.arange(len(paths)), emb_all
    if args.embed_only or len(idx) < 1200:
        return
    y = labels[idx]

    # a full-size pool for the timing: the cached rows, resampled to 15,000 if the pass is incomplete
    full = np.random.default_rng(0).choice(len(idx), size=len(paths)) if len(idx) < len(paths) else np.arange(len(idx))
    if len(idx) < len(paths):
        print(f"(round timing on {len(idx)} cached embeddings resampled to {len(paths)} rows)")
    round_timing(emb[full], y[full], classes, n_labels=1000, batch=100)

    budgets = [50, 100, 200, 400, 750]
    test = grouped_test_split(groups[idx])
    print(f"learning curve, plain embeddings ({len(idx)} images, {test.sum()} test by group, mean of 5 draws):")
    for c in (TrainConfig().head_c, 0.05):
        curve = learning_curve(emb, y, test, classes, budgets, seeds=5, head_c=c)
        print(f"  C={c}: " + "  ".join(f"{b}: {a:.3f}" for b, a in curve.items()), flush=True)

    if not args.no_tta:
        tta_experiment(paths, labels, groups, classes, args.tta_subset)


def tta_experiment(paths: list[str], labels: np.ndarray, groups: np.ndarray, classes: list[str], size: int) -> None:
    """Plain vs dihedral-TTA embeddings on the same images (8x compute, so a subset): a third of the subset from
    the held-out groups, the rest a labelled pool for random budgets. Images come from the start of the pass
    order, so they are already cached by a partial pool pass."""
    first = np.random.default_rng(0).permutation(len(paths))[:5000]
    test = grouped_test_split(groups)
    rng = np.random.default_rng(1)
    test_rows = rng.choice(first[test[first]], size=size // 3, replace=False)
    train_rows = rng.choice(first[~test[first]], size=size - len(test_rows), replace=False)
    rows = np.concatenate([train_rows, test_rows])
    sub_paths = [paths[r] for r in rows]
    plain, _ = pool_embeddings(sub_paths)
    tta, seconds = pool_embeddings(sub_paths, tta=True)
    print(f"TTA embeddings: {len(rows)} images in {seconds:.1f}s")
    sub_test = np.zeros(len(rows), dtype=bool)
    sub_test[len(train_rows) :] = True
    budgets = [b for b in (25, 50, 100, 200, 400, 750) if b < len(train_rows)]
    print(f"TTA comparison: {len(train_rows)} pool / {len(test_rows)} held-out-group images, mean of 5 draws")
    for name, e in (("plain", plain), ("dihedral TTA", tta)):
        c = learning_curve(e, labels[rows], sub_test, classes, budgets, seeds=5)
        print(f"  {name:12s} " + "  ".join(f"{b}: {a:.3f}" for b, a in c.items()), flush=True)


if __name__ == "__main__":
    main()
