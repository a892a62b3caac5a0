"""Two labelling policies compared on the same crowd, seeds, splits and arms (issue 15's benchmark, and its
smoke test): every run through the platform's loop, then on each run's final votes the consensus decoders
(learner.simulation.decoding) and the students' accuracy over their votes; the figures are the accuracy
against cost curves per policy, the cost at which the candidate reaches the baseline's final accuracy, the
accuracy difference at equal cost, and the platform consensus's share of the true decoder's gain."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import learning_curves
from .decoding import decoder_accuracies, student_accuracy_by_vote
from .runs import Config, simulate_run, split_rows, start_run
from .source import Progress, SourceSet, source_embeddings

DECODERS = ("majority", "platform", "true_confusion")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def compare_policies(
    source: SourceSet, cfg: Config, progress: Progress | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (seed, arm, policy) of ``cfg``: the rounds' rows, and per run the consensus decoders and the
    students' accuracy over their votes."""
    if source.embeddings is None:
        source_embeddings(source, progress)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        split = split_rows(source, cfg, seed)
        for warning in split.warnings:
            if progress:
                progress(f"WARNING: {warning}")
        for arm in cfg.arms:
            for setting in cfg.settings:
                started = time.monotonic()
                run = start_run(source, split, arm, setting, cfg)
                rows += simulate_run(run, cfg, progress)
                runs.append(
                    {
                        "setting": setting.name,
                        "policy": setting.policy,
                        "arm": arm,
                        "seed": seed,
                        "project": run.project.pk,
                        "decoders": decoder_accuracies(run),
                        "students": student_accuracy_by_vote(run, parts=3),
                        "seconds": round(time.monotonic() - started, 1),
                    }
                )
    return rows, runs


def policy_figures(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    arms: tuple[str, ...],
    baseline: str = "today",
    candidate: str = "new",
) -> dict[str, Any]:
    """Per arm: each policy's curve (mean ± sd of cost and accuracy per budget), the candidate's cost to reach
    the baseline's final accuracy and its ratio to the baseline's final cost, the accuracy difference in points
    at the lower of the two final costs, and each policy's decoder accuracies (mean ± sd over runs) with the
    platform's share of the true decoder's gain (of the means, and per run)."""
    data = learning_curves.cost_curves(rows)
    out: dict[str, Any] = {}
    for arm in arms:
        by_policy = {r["policy"]: r["setting"] for r in runs if r["arm"] == arm}
        base_curve = data.get((by_policy.get(baseline, ""), arm))
        cand_curve = data.get((by_policy.get(candidate, ""), arm))
        if not base_curve or not cand_curve:
            continue
        curves: dict[str, list[dict[str, Any]]] = {}
        for policy, curve in ((baseline, base_curve), (candidate, cand_curve)):
            curves[policy] = [
                {
                    "budget": b,
                    "cost": mean_sd(curve[b][0]),
                    "accuracy": mean_sd(curve[b][1]),
                    "seeds": len(curve[b][1]),
                }
                for b in sorted(curve)
            ]
        base_cost, base_final = curves[baseline][-1]["cost"][0], curves[baseline][-1]["accuracy"][0]
        need = learning_curves.cost_to_reach(cand_curve, base_final)
        spend = min(base_cost, curves[candidate][-1]["cost"][0])
        at_cand = learning_curves.value_at_cost(cand_curve, spend)
        at_base = learning_curves.value_at_cost(base_curve, spend)
        decoders: dict[str, Any] = {}
        for policy in (baseline, candidate):
            mine = [r["decoders"] for r in runs if r["arm"] == arm and r["policy"] == policy]
            acc = {k: mean_sd([d["accuracy"][k] for d in mine]) for k in DECODERS}
            gain_true = acc["true_confusion"][0] - acc["majority"][0]
            shares = [d["share_of_true_gain"] for d in mine if d["share_of_true_gain"] is not None]
            decoders[policy] = {
                "accuracy": acc,
                "share_of_true_gain": (acc["platform"][0] - acc["majority"][0]) / gain_true if gain_true > 0 else None,
                "share_per_run": mean_sd(shares) if shares else None,
                "patches": float(np.mean([d["patches"] for d in mine])),
            }
        out[arm] = {
            "baseline": baseline,
            "candidate": candidate,
            "curves": curves,
            "baseline_final_accuracy": base_final,
            "baseline_final_cost": base_cost,
            "candidate_cost_to_reach_baseline_final": need,
            "cost_ratio": need / base_cost if need is not None else None,
            "equal_cost": spend,
            "points_at_equal_cost": 100 * (at_cand - at_base) if at_cand is not None and at_base is not None else None,
            "decoders": decoders,
        }
    return out
