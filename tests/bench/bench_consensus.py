"""Benchmark: how much do the consensus methods recover the truth from simulated noisy annotators?

Ground truth is the real label of every LC25000 lung image (manifest.csv); the annotators are simulated:

- 5 crowd annotators, each with a per-class accuracy drawn uniformly from [0.60, 0.85]. `--biased` of them
  (default 2) favour one class chosen at random: 80% of their mistakes go to it (the rest spread evenly).
- 1 expert (accuracy 0.95, mistakes spread evenly) labels 10% of the images; those labels are the gold set.
- Each image gets votes from `k` of the 5 crowd annotators: k=3 (the platform's default votes_required)
  and k=5.

Every method runs through `annotations.domain.consensus.batch_consensus`, exactly as the platform calls it.
"oracle" is the Bayes-optimal decision using the *true* simulated confusion matrices: no aggregator can beat
it on average, so it shows how much room there is above majority vote at this noise level.

    .venv/bin/python tests/bench/bench_consensus.py [--seeds 5] [--subset 1500] [--json results.json]

Takes about 3-5 minutes on 2 cores (GLAD and MACE dominate; they run on a random subset of images).

``--recompute`` measures something else: a project's bulk recompute (``recompute_project_consensus``, what a
round's snapshot runs) at scale, on the platform's tables (tests/bench/bench_consensus_recompute.py, where the
options are described):

    .venv/bin/python tests/bench/bench_consensus.py --recompute [--votes 3000000] [--repeats 5] [--old-repeats 1]
        [--method dawid_skene] [--database NAME] [--keep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from annotations.domain.consensus import VoteRecord, batch_consensus  # noqa: E402

DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "lc25000_lung" / "manifest.csv"
N_CROWD = 5
EXPERT_ID = "expert"
EXPERT_ACCURACY = 0.95
EXPERT_FRACTION = 0.10
ACCURACY_RANGE = (0.60, 0.85)
BIAS_SHARE = 0.8
VOTES_REQUIRED = 3  # the platform default; with k=3 every crowd-only item reaches it


@dataclass(frozen=True)
class Crowd:
    confusion: np.ndarray  # (annotator, truth, answer) probabilities
    biased: tuple[int, ...]
    targets: tuple[int, ...]


def draw_crowd(rng: np.random.Generator, n_classes: int, n_biased: int) -> Crowd:
    accuracy = rng.uniform(*ACCURACY_RANGE, size=(N_CROWD, n_classes))
    biased = tuple(int(a) for a in rng.choice(N_CROWD, size=n_biased, replace=False))
    targets = tuple(int(t) for t in rng.integers(n_classes, size=n_biased))
    confusion = np.zeros((N_CROWD, n_classes, n_classes))
    for a in range(N_CROWD):
        for t in range(n_classes):
            wrong = np.ones(n_classes) / (n_classes - 1)
            if a in biased and targets[biased.index(a)] != t:
                target = targets[biased.index(a)]
                wrong = (1 - BIAS_SHARE) / (n_classes - 1) + BIAS_SHARE * (np.arange(n_classes) == target)
            wrong[t] = 0.0
            confusion[a, t] = (1 - accuracy[a, t]) * wrong / wrong.sum()
            confusion[a, t, t] = accuracy[a, t]
    return Crowd(confusion=confusion, biased=biased, targets=targets)


def expert_confusion(n_classes: int) -> np.ndarray:
    off = (1 - EXPERT_ACCURACY) / (n_classes - 1)
    return np.full((n_classes, n_classes), off) + (EXPERT_ACCURACY - off) * np.eye(n_classes)


def sample_answers(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    """One answer per row of a (n, classes) probability matrix."""
    u = rng.random(len(rows))[:, None]
    return np.minimum((u > np.cumsum(rows, axis=1)).sum(axis=1), rows.shape[1] - 1)


def simulate(
    rng: np.random.Generator, truth: np.ndarray, crowd: Crowd, k: int, labels: Sequence[str]
) -> tuple[list[VoteRecord], dict[int, str], np.ndarray]:
    """Votes (crowd + expert), the gold set (the expert's labels) and the mask of expert-labelled items."""
    n = len(truth)
    annotators = np.argsort(rng.random((n, N_CROWD)), axis=1)[:, :k]
    items = np.repeat(np.arange(n), k)
    who = annotators.ravel()
    answers = sample_answers(rng, crowd.confusion[who, truth[items]])
    votes = [
        VoteRecord(item=int(i), annotator=int(a), label=labels[c], role="crowd")
        for i, a, c in zip(items, who, answers, strict=True)
    ]
    expert_items = rng.choice(n, size=round(EXPERT_FRACTION * n), replace=False)
    expert_answers = sample_answers(rng, expert_confusion(len(labels))[truth[expert_items]])
    gold = {int(i): labels[c] for i, c in zip(expert_items, expert_answers, strict=True)}
    votes += [VoteRecord(item=i, annotator=EXPERT_ID, label=label, role="expert") for i, label in gold.items()]
    mask = np.zeros(n, dtype=bool)
    mask[expert_items] = True
    return votes, gold, mask


def oracle_labels(votes: Sequence[VoteRecord], crowd: Crowd, labels: Sequence[str], n: int) -> np.ndarray:
    # Written out by hand on purpose: it is the yardstick (true parameters, uniform prior), not a method.
    index = {label: i for i, label in enumerate(labels)}
    log_post = np.zeros((n, len(labels)))
    expert = np.log(expert_confusion(len(labels)))
    for v in votes:
        matrix = expert if v.role == "expert" else np.log(crowd.confusion[int(v.annotator)])
        log_post[int(v.item)] += matrix[:, index[v.label]]
    return np.argmax(log_post, axis=1)


def run_once(
    truth: np.ndarray, labels: Sequence[str], crowd: Crowd, k: int, seed: int, methods: Sequence[str]
) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng([seed, k, len(truth)])
    votes, gold, expert_mask = simulate(rng, truth, crowd, k, labels)
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        start = time.perf_counter()
        if method == "oracle":
            predicted = oracle_labels(votes, crowd, labels, len(truth))
        else:
            results = batch_consensus(votes, labels, method=method, votes_required=VOTES_REQUIRED, gold=gold, seed=seed)
            index = {label: i for i, label in enumerate(labels)}
            predicted = np.array([index.get(results[i].label or "", -1) for i in range(len(truth))])
        correct = predicted == truth
        out[method] = {
            "accuracy": float(correct.mean()),
            "accuracy_non_expert_items": float(correct[~expert_mask].mean()),
            "seconds": time.perf_counter() - start,
        }
    return out


def summarise(runs: list[dict[str, dict[str, float]]], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for method in methods:
        acc = [r[method]["accuracy"] for r in runs]
        rest = [r[method]["accuracy_non_expert_items"] for r in runs]
        diff = [100 * (r[method]["accuracy"] - r["majority"]["accuracy"]) for r in runs]
        ratio = [r[method]["accuracy"] / r["majority"]["accuracy"] for r in runs]
        summary[method] = {
            "accuracy_mean": statistics.mean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "non_expert_accuracy_mean": statistics.mean(rest),
            "diff_vs_majority_points_mean": statistics.mean(diff),
            "diff_vs_majority_points_sd": statistics.stdev(diff) if len(diff) > 1 else 0.0,
            "ratio_vs_majority_mean": statistics.mean(ratio),
            "seconds_mean": statistics.mean(r[method]["seconds"] for r in runs),
        }
    return summary


def print_table(title: str, summary: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'method':<16}{'accuracy':>17}{'non-expert items':>18}{'Δ vs majority (pts)':>22}{'ratio':>8}{'s/run':>8}")
    for method, s in summary.items():
        print(
            f"{method:<16}{s['accuracy_mean']:>10.4f} ± {s['accuracy_sd']:.4f}{s['non_expert_accuracy_mean']:>18.4f}"
            f"{s['diff_vs_majority_points_mean']:>+14.2f} ± {s['diff_vs_majority_points_sd']:.2f}"
            f"{s['ratio_vs_majority_mean']:>8.3f}{s['seconds_mean']:>8.2f}"
        )


def experiment(
    truth_all: np.ndarray,
    labels: Sequence[str],
    *,
    seeds: int,
    k: int,
    n_biased: int,
    methods: Sequence[str],
    subset: int | None,
) -> dict[str, dict[str, float]]:
    runs = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        crowd = draw_crowd(rng, len(labels), n_biased)
        truth = truth_all if subset is None else truth_all[rng.choice(len(truth_all), size=subset, replace=False)]
        runs.append(run_once(truth, labels, crowd, k, seed, methods))
    return summarise(runs, methods)


def main() -> None:
    if "--recompute" in sys.argv:
        from tests.bench.bench_consensus_recompute import main as recompute_main

        sys.argv.remove("--recompute")
        sys.exit(recompute_main())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--biased", type=int, default=2, help="how many of the 5 crowd annotators favour one class")
    parser.add_argument("--subset", type=int, default=1500, help="images per seed for the table with GLAD and MACE")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 to report a standard deviation")

    manifest = pd.read_csv(args.manifest)
    labels = sorted(manifest["label"].unique())
    truth_all = manifest["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    print(
        f"LC25000 lung: {len(truth_all)} images, labels {labels}; {N_CROWD} crowd annotators "
        f"(accuracy U{ACCURACY_RANGE}, {args.biased} biased), expert on {EXPERT_FRACTION:.0%} (acc {EXPERT_ACCURACY}, "
        f"= gold); {args.seeds} seeds; mean ± sd; Δ and ratio vs majority vote in the same run"
    )
    started = time.perf_counter()
    results: dict[str, object] = {"labels": labels, "seeds": args.seeds, "biased": args.biased}

    cheap = ["majority", "weighted", "expert_override", "dawid_skene", "oracle"]
    every = ["majority", "weighted", "expert_override", "dawid_skene", "glad", "mace", "oracle"]
    for k in (3, 5):
        key = f"all_images_k{k}"
        results[key] = experiment(
            truth_all, labels, seeds=args.seeds, k=k, n_biased=args.biased, methods=cheap, subset=None
        )
        print_table(f"All {len(truth_all)} images, {k} crowd votes per image", results[key])  # type: ignore[arg-type]
    for k in (3, 5):
        key = f"subset_k{k}"
        results[key] = experiment(
            truth_all, labels, seeds=args.seeds, k=k, n_biased=args.biased, methods=every, subset=args.subset
        )
        print_table(f"{args.subset}-image random subset, {k} crowd votes per image", results[key])  # type: ignore[arg-type]

    # How the gain over majority depends on annotator bias (k=3, where the platform runs).
    sensitivity: dict[int, dict[str, dict[str, float]]] = {}
    print("\nSensitivity to bias, all images, 3 votes: Δ vs majority in points (mean ± sd)")
    print(f"{'biased':<8}{'majority acc':>14}{'dawid_skene':>16}{'oracle':>16}")
    for n_biased in (0, 2, 4):
        s = experiment(
            truth_all, labels, seeds=args.seeds, k=3, n_biased=n_biased, methods=["majority", "dawid_skene", "oracle"],
            subset=None,
        )  # fmt: skip
        sensitivity[n_biased] = s
        ds, oracle = s["dawid_skene"], s["oracle"]
        print(
            f"{n_biased:<8}{s['majority']['accuracy_mean']:>14.4f}"
            f"{ds['diff_vs_majority_points_mean']:>+10.2f} ± {ds['diff_vs_majority_points_sd']:.2f}"
            f"{oracle['diff_vs_majority_points_mean']:>+10.2f} ± {oracle['diff_vs_majority_points_sd']:.2f}"
        )
    results["bias_sensitivity_k3"] = sensitivity

    gain = results["all_images_k3"]["dawid_skene"]["diff_vs_majority_points_mean"]  # type: ignore[index]
    verdict = "MET" if gain >= 3 else "NOT MET"
    print(f"\nGoal (dawid_skene >= majority + 3 points, 3 votes, all images): {verdict} ({gain:+.2f} points)")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
