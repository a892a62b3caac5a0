"""Learning-curve reporting for active-learning runs: the CSV of rounds, the per-arm summary
(labels needed to reach a target accuracy, random/arm ratios) and the plot. No Django."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

CSV_FIELDS = (
    "setting", "arm", "seed", "round", "budget", "labels", "votes", "test_accuracy", "test_balanced_accuracy",
    "test_macro_f1", "test_auc", "consensus_accuracy", "label_groups", "val_accuracy", "val_split",
    "acc_supervised_only", "round_seconds", "project", "round_id", "training_labels",
)  # fmt: skip
# The column the curves, the summary and the plot are drawn from.
METRIC = "test_accuracy"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def curves(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(setting, arm): {budget: [METRIC per seed]}}, budget rows only."""
    out: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if r.get("budget") in (None, "") or r.get(METRIC) in (None, ""):
            continue
        out.setdefault((r["setting"], r["arm"]), {}).setdefault(int(r["budget"]), []).append(float(r[METRIC]))
    return out


def labels_to_reach(curve: dict[int, list[float]], target: float) -> float | None:
    """Labels at which the mean curve first reaches ``target`` (linear between budgets); None if never."""
    budgets = sorted(curve)
    means = [float(np.mean(curve[b])) for b in budgets]
    for i, (b, m) in enumerate(zip(budgets, means, strict=True)):
        if m >= target:
            if i == 0:
                return float(b)
            b0, m0 = budgets[i - 1], means[i - 1]
            return b0 + (target - m0) / (m - m0) * (b - b0)
    return None


def summary(rows: list[dict[str, Any]], target: float | None = None) -> str:
    """Mean ± sd per budget and arm, labels each arm needs to reach the target, and random/arm ratios.

    Without a ``target``, each setting's target is the accuracy random reaches at the largest budget.
    """
    data = curves(rows)
    lines: list[str] = []
    for setting in sorted({s for s, _ in data}):
        arms = [a for s, a in sorted(data) if s == setting]
        arms.sort(key=lambda a: (a != "random", a))
        budgets = sorted({b for a in arms for b in data[(setting, a)]})
        lines.append(f"\n[{setting}] {METRIC}, mean ± sd over seeds")
        lines.append(f"{'arm':18s}" + "".join(f"{b:>16d}" for b in budgets))
        for arm in arms:
            cells = []
            for b in budgets:
                values = data[(setting, arm)].get(b, [])
                cells.append(f"{np.mean(values):.3f}±{np.std(values):.3f} ({len(values)})" if values else "-")
            lines.append(f"{arm:18s}" + "".join(f"{c:>16s}" for c in cells))
        random_curve = data.get((setting, "random"))
        goal = target
        if goal is None and random_curve:
            goal = float(np.mean(random_curve[max(random_curve)]))
        if goal is None:
            continue
        lines.append(f"labels to reach {METRIC} {goal:.3f}:")
        base = labels_to_reach(random_curve, goal) if random_curve else None
        for arm in arms:
            need = labels_to_reach(data[(setting, arm)], goal)
            ratio = f"random/{arm} = {base / need:.2f}" if base and need and arm != "random" else ""
            shown = f"{need:.0f}" if need is not None else f"> {max(data[(setting, arm)])}"
            lines.append(f"  {arm:18s} {shown:>8s}  {ratio}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Learning curves, one panel per setting: the mean per arm with a min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(rows)
    settings = sorted({s for s, _ in data})
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(6 * max(1, len(settings)), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=False):
        for arm in sorted(a for s, a in data if s == setting):
            curve = data[(setting, arm)]
            b = sorted(curve)
            mean = [np.mean(curve[x]) for x in b]
            line = ax.plot(b, mean, marker="o", label=arm, linestyle="--" if arm == "random" else "-")[0]
            ax.fill_between(b, [min(curve[x]) for x in b], [max(curve[x]) for x in b], alpha=0.15,
                            color=line.get_color())  # fmt: skip
        ax.set_xscale("log")
        budgets = sorted({b for (s, _), curve in data.items() if s == setting for b in curve})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labels")
        ax.set_ylabel(METRIC.replace("_", " "))
        ax.set_title(f"{setting}: mean and min-max over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
