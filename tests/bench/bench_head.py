"""The head's fit at many labels: its memory and time against the former fit, and what a label cap costs.

    .venv/bin/python tests/bench/bench_head.py [--labels 100000] [--dim 1904] [--repeats 3] [--accuracy]

**Memory and time.** ``--labels`` synthetic vectors (clustered by class, 3 classes, unbalanced 6:3:1) in a slide
file of the embedding store, as a round reads them, fitted three ways, each in a fresh process so that its
peak RSS is its own (``ru_maxrss`` less the process's RSS before the fit):

- ``former``: the fit before this change, in the same run: the rows read into a float32 array
  (``emb.take``), ``StandardScaler`` fitted and its float32 copy made, then ``LogisticRegression`` (lbfgs,
  which copies that to float64), with the platform's settings (``TrainConfig``'s C, iterations, balanced
  class weights);
- ``head``: ``train_head`` on the store's rows (``Rows``): one float64 design matrix filled chunk by chunk;
- ``capped``: the same on a class sample of ``--cap`` labels (``class_sample``, what a round fits on beyond
  LEARNER HEAD_MAX_LABELS).

Printed per variant: median and p95 over ``--repeats`` of the fit's seconds and its peak RSS above the
process's start, the ratio to ``former``, and how far ``head``'s probabilities are from ``former``'s.

**Accuracy** (``--accuracy``): LC25000 lung embeddings (cached by bench_learner.py under var/cache/bench, made
on the first run, minutes on 2 cores), a grouped 80/20 split, and the head fitted on every training label
against class samples of 1/2, 1/4 and 1/8 of them: the test balanced accuracy of each, over three split seeds.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from learner.core.backbone import Backbone  # noqa: E402
from learner.core.config import BackboneSpec, TrainConfig  # noqa: E402
from learner.core.data import Normalisation  # noqa: E402
from learner.core.embedding_store import EmbeddingStore, SlideRows  # noqa: E402
from learner.core.training import class_sample, train_head  # noqa: E402

CLASSES = ["a", "b", "c"]
MIX = np.array([0.6, 0.3, 0.1])


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def toy_backbone(dim: int) -> Backbone:
    import torch

    return Backbone(torch.nn.Identity(), BackboneSpec(), "bench", Normalisation((0.5,) * 3, (0.5,) * 3), dim)


def write_pool(root: Path, n: int, dim: int) -> None:
    """n vectors around three class centres, written in 16 slices of one slide file; their labels beside it."""
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=n, p=MIX)
    centres = rng.standard_normal((3, dim)).astype(np.float32) * 0.15
    store = EmbeddingStore(root, "bench", dim)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(n, start + 65_536)
        x[start:stop] = centres[y[start:stop]] + rng.standard_normal((stop - start, dim), dtype=np.float32)
    xy = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)
    store.put_slide("pool", xy, x)
    np.save(root / "labels.npy", y)


def pool_rows(root: Path, dim: int) -> tuple[SlideRows, np.ndarray]:
    y = np.load(root / "labels.npy")
    store = EmbeddingStore(root, "bench", dim)
    return SlideRows([store.vectors_file("pool")], np.zeros(len(y), dtype=np.int32), np.arange(len(y)), dim), y


def former_fit(rows: SlideRows, y: np.ndarray, config: TrainConfig) -> np.ndarray:
    """The head's fit before this change (train_head's body for hard labels, as it was); the fitted
    model's probabilities for the first 2,000 rows."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = rows.take(np.arange(len(rows)))
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(
        C=config.head_c, max_iter=config.head_max_iter, class_weight="balanced", random_state=config.seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x), y)
    return clf.predict_proba(scaler.transform(x[:2000]))


def child(variant: str, root: Path, dim: int, cap: int) -> dict[str, float]:
    """One fit in this process: its seconds and peak RSS above the start; its probabilities saved."""
    rows, y = pool_rows(root, dim)
    config = TrainConfig()
    before = rss_mb()
    started = time.perf_counter()
    if variant == "former":
        proba = former_fit(rows, y, config)
    else:
        idx = np.arange(len(y)) if variant == "head" else class_sample(y, cap, balanced=True, seed=config.seed)
        head = train_head(rows.subset(idx), y[idx], CLASSES, toy_backbone(dim), config)
        proba = head.predict_proba(rows.take(np.arange(2000)))
    seconds = time.perf_counter() - started
    np.save(root / f"proba-{variant}.npy", proba)
    return {"seconds": seconds, "peak_mb": peak_mb() - before}


def run_child(variant: str, root: Path, dim: int, cap: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--root", str(root), "--dim", str(dim), "--cap", str(cap)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def memory(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
        root = Path(tmp)
        write_pool(root, args.labels, args.dim)
        runs: dict[str, list[dict[str, float]]] = {"former": [], "head": [], "capped": []}
        for _ in range(args.repeats):  # interleaved, so that load on the machine falls on every variant alike
            for variant in runs:
                runs[variant].append(run_child(variant, root, args.dim, args.cap))
        former = np.load(root / "proba-former.npy")
        gap = float(np.abs(np.load(root / "proba-head.npy") - former).max())
        capped_gap = float(np.abs(np.load(root / "proba-capped.npy") - former).max())
    print(f"\nhead fit on {args.labels:,} labels x {args.dim} features (3 classes 6:3:1), {args.repeats} runs each:")
    result: dict[str, Any] = {"labels": args.labels, "dim": args.dim, "cap": args.cap}
    base = {k: statistics.median(r[k] for r in runs["former"]) for k in ("seconds", "peak_mb")}
    for variant, found in runs.items():
        sec, mb = [r["seconds"] for r in found], [r["peak_mb"] for r in found]
        med_s, med_mb = statistics.median(sec), statistics.median(mb)
        print(
            f"  {variant:7s} {med_s:6.1f} s (p95 {p95(sec):.1f}, {med_s / base['seconds']:.2f}x)  "
            f"peak +{med_mb:,.0f} MB (p95 {p95(mb):,.0f}, {med_mb / base['peak_mb']:.2f}x)"
        )
        result[variant] = {"seconds": med_s, "peak_mb": med_mb}
    print(f"  head vs former: largest probability difference {gap:.2e}; capped vs former {capped_gap:.2e}")
    result["head_vs_former_max_abs"] = gap
    result["capped_vs_former_max_abs"] = capped_gap
    return result


def accuracy() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    import bench_learner as lc

    from learner.core.backbone import create_backbone
    from learner.core.evaluation import evaluate

    paths, labels, groups, classes = lc.read_manifest()
    emb, seconds = lc.pool_embeddings(paths)
    print(f"\nLC25000 lung: {len(paths):,} embeddings x {emb.shape[1]} ({seconds:.0f} s, cached after the first run)")
    backbone = create_backbone()
    fractions = [1.0, 0.5, 0.25, 0.125]
    scores: dict[float, list[float]] = {f: [] for f in fractions}
    for seed in range(3):
        test = lc.grouped_test_split(groups, 0.2, seed)
        train = np.flatnonzero(~test)
        for fraction in fractions:
            cap = int(len(train) * fraction)
            idx = train[class_sample(labels[train], cap, balanced=True, seed=seed)]
            head = train_head(emb[idx], labels[idx], classes, backbone, TrainConfig(seed=seed))
            m = evaluate(labels[test], head.predict_proba(emb[test]), classes)
            scores[fraction].append(m["balanced_accuracy"])
    full = statistics.mean(scores[1.0])
    out: dict[str, Any] = {}
    print("  test balanced accuracy, grouped 80/20, 3 split seeds (mean, range):")
    for fraction, found in scores.items():
        mean = statistics.mean(found)
        n = int((len(labels) * 0.8) * fraction)
        print(
            f"  {fraction:5.3f} of the ~{n:,} training labels: {mean:.4f} ({min(found):.4f}-{max(found):.4f}), "
            f"{100 * (mean - full):+.2f} points"
        )
        out[str(fraction)] = mean
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1904)
    parser.add_argument("--cap", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.root), args.dim, args.cap)))
        return
    print(f"load {os.getloadavg()[0]:.2f} at start")
    result = memory(args)
    if args.accuracy:
        result["accuracy"] = accuracy()
    print(f"load {os.getloadavg()[0]:.2f} at end")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
