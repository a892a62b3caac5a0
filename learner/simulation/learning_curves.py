"""Learning-curve reporting for active-learning runs: the CSV of rounds, the per-arm summary
(labels needed to reach a target accuracy, random/arm ratios) and the plot. No Django."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

import numpy as np

CSV_FIELDS = (
    "setting", "arm", "seed", "round", "budget", "labels", "votes", "crowd_votes", "expert_votes", "cost",
    "expert_cost", "crowd_cost", "test_accuracy", "test_balanced_accuracy",
    "test_macro_f1", "test_auc", "consensus_accuracy", "label_groups", "val_accuracy", "val_split",
    "acc_supervised_only", "round_seconds", "project", "round_id", "split_warnings",
    "training_labels", "policy",
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


def cost_curves(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, tuple[list[float], list[float]]]]:
    """{(setting, arm): {budget: ([cost per seed], [METRIC per seed])}}, budget rows that carry a cost."""
    out: dict[tuple[str, str], dict[int, tuple[list[float], list[float]]]] = {}
    for r in rows:
        if r.get("budget") in (None, "") or r.get(METRIC) in (None, "") or r.get("cost") in (None, ""):
            continue
        costs, values = out.setdefault((r["setting"], r["arm"]), {}).setdefault(int(r["budget"]), ([], []))
        costs.append(float(r["cost"]))
        values.append(float(r[METRIC]))
    return out


def _mean_points(curve: dict[int, tuple[list[float], list[float]]]) -> list[tuple[float, float]]:
    """(mean cost, mean METRIC) per budget, in budget order."""
    return [(float(np.mean(curve[b][0])), float(np.mean(curve[b][1]))) for b in sorted(curve)]


def cost_to_reach(curve: dict[int, tuple[list[float], list[float]]], target: float) -> float | None:
    """Annotation cost at which the mean curve first reaches ``target`` (linear between budgets)."""
    points = _mean_points(curve)
    for i, (cost, value) in enumerate(points):
        if value >= target:
            if i == 0:
                return cost
            c0, v0 = points[i - 1]
            return c0 + (target - v0) / (value - v0) * (cost - c0)
    return None


def value_at_cost(curve: dict[int, tuple[list[float], list[float]]], cost: float) -> float | None:
    """The mean curve's METRIC at ``cost`` (linear between budgets); None outside the costs it spans."""
    points = sorted(_mean_points(curve))
    for (c0, v0), (c1, v1) in itertools.pairwise(points):
        if c0 <= cost <= c1:
            return v0 if c1 == c0 else v0 + (cost - c0) / (c1 - c0) * (v1 - v0)
    if points and abs(points[-1][0] - cost) < 1e-9:
        return points[-1][1]
    return None


def cost_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy against cumulative annotation cost, per arm and per setting (labelling policy).

    For each arm: every setting's cost and METRIC at each budget; then the cost each setting needs to reach
    the lowest final accuracy any setting of the arm reached (so all of them reach it), and each setting's
    METRIC at the lowest final cost any of them spent (so all of them spent it), beside the first setting's."""
    data = cost_curves(rows)
    if not data:
        return []
    units = {(float(r["expert_cost"]), float(r["crowd_cost"])) for r in rows if r.get("expert_cost") not in (None, "")}
    priced = ", ".join(f"expert {e:g} : crowd {c:g}" for e, c in sorted(units)) or "the projects' costs"
    lines = [f"\n{METRIC} against annotation cost ({priced}; the up-front gold set not counted)"]
    for arm in sorted({a for _, a in data}, key=lambda a: (a != "random", a)):
        settings = sorted(s for s, a in data if a == arm)
        lines.append(f"[{arm}] mean cost -> mean {METRIC} per budget")
        for setting in settings:
            curve = data[(setting, arm)]
            cells = [f"{b}: {np.mean(curve[b][0]):.0f} -> {np.mean(curve[b][1]):.3f}" for b in sorted(curve)]
            lines.append(f"  {setting:18s} " + "   ".join(cells))
        if len(settings) < 2:
            continue
        finals = {s: _mean_points(data[(s, arm)])[-1] for s in settings}
        goal = min(v for _, v in finals.values())
        spend = min(c for c, _ in finals.values())
        # The baseline: today's policy when policies are compared, else the fixed-redundancy noisy crowd.
        base = next((s for s in settings if s.endswith("-today")), "noisy" if "noisy" in settings else settings[0])
        base_cost = cost_to_reach(data[(base, arm)], goal)
        base_value = value_at_cost(data[(base, arm)], spend)
        lines.append(f"  cost to reach {METRIC} {goal:.3f} / {METRIC} at cost {spend:.0f}:")
        for setting in settings:
            need = cost_to_reach(data[(setting, arm)], goal)
            value = value_at_cost(data[(setting, arm)], spend)
            ratio = f"{need / base_cost:.0%} of {base}'s cost" if need is not None and base_cost else ""
            gain = f"{(value - base_value) * 100:+.2f} points" if value is not None and base_value is not None else ""
            shown = f"{need:.0f}" if need is not None else "not reached"
            at = f"{value:.3f}" if value is not None else "-"
            lines.append(f"    {setting:18s} {shown:>10s} {ratio:>26s}   {at:>6s} {gain}")
    return lines


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
    lines: list[str] = split_warnings(rows)
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
    lines.extend(cost_summary(rows))
    return "\n".join(lines)


def split_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """The splits' warnings (a class missing from the pool or the test set, a class split by image), once
    each, as a block no reader of the summary can miss; empty when every split is whole."""
    seen: dict[str, None] = {}
    for r in rows:
        for warning in str(r.get("split_warnings") or "").split(" | "):
            if warning:
                seen.setdefault(warning, None)
    if not seen:
        return []
    missing = any("has no image in the" in w for w in seen)
    lines = ["", "!" * 100, "!!! WARNING: the split is not whole; the curves below are capped or unmeasured for:"]
    lines += [f"!!!   {w}" for w in seen]
    if missing:
        lines.append("!!! Rerun with --stratify to keep every class in both the pool and the test set.")
    lines.append("!" * 100)
    return lines


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


def plot_cost(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against annotation cost, one panel per arm, a line per setting (policy): the mean over
    seeds at each budget, with the min-max band of both. False (nothing written) when no row has a cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = cost_curves(rows)
    if not data:
        return False
    arms = sorted({a for _, a in data})
    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4.5), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        for setting in sorted(s for s, a in data if a == arm):
            curve = data[(setting, arm)]
            b = sorted(curve)
            cost = [np.mean(curve[x][0]) for x in b]
            line = ax.plot(cost, [np.mean(curve[x][1]) for x in b], marker="o", label=setting)[0]
            ax.fill_between(cost, [min(curve[x][1]) for x in b], [max(curve[x][1]) for x in b], alpha=0.15,
                            color=line.get_color())  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("annotation cost (cumulative)")
        ax.set_ylabel(METRIC.replace("_", " "))
        ax.set_title(f"{arm}: mean and min-max over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
