"""Today's labelling policy against the new one on LC25000 lung, with students who improve (issue 15).

    .venv/bin/python tests/bench/bench_crowd_policy.py [--per-group 3] [--seeds 3] [--arms margin] \
        [--budgets 50,100,200,400] [--new-setting NAME=VALUE ...] [--json out.json]

The crowd is learner.simulation's ``improving`` setting: 5 students whose per-class accuracy rises from
U(0.5, 0.7) at their first vote to U(0.8, 0.9) over their first 300 votes, and an expert right 95% of the
time; an expert vote costs 10 crowd votes. Each policy (``learner.simulation.policies``: today = 3 votes
per patch, contested patches to the expert, hard labels; new = adaptive redundancy weighed by the model's
posterior, up to 5 votes, experts only for a patch still split at the cap, posterior-weighted labels) is a
set of project fields on the run projects; every decision is then the platform's own (lease_next_task, cast_vote, the
consensus, the rounds), only the people are simulated. Same seeds and splits as ``manage.py simulate``
(grouped test and gold sets, ``split_rows``), the same annotators and images for both policies of a seed.

Reports, per policy, test accuracy against cumulative annotation cost (mean ± sd over seeds at each
budget), the cost at which the new policy reaches today's final accuracy (goal: at most 60% of today's),
the accuracy difference at equal cost (goal: +1 point or more), and on each run's final votes the
consensus accuracy of majority vote, of the platform's Dawid-Skene and of the decoder that knows every
vote's true confusion (goal: the platform reaches 95% of that decoder's gain over majority). It prints a
table and ends with one line of JSON. ``--per-group N`` takes the first N images of each LC25000 group
(all 740 groups); without it, every image.

Point DATABASE_URL at a scratch database (the runs' projects stay there); without it the embedded
PostgreSQL is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DEBUG", "1")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

from learner import simulation as sim  # noqa: E402
from learner.simulation import learning_curves  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lc25000_lung"
SOURCE_NAME = "simulation source: lc25000_lung"  # bench_active_learning's: one ingest serves both
GOAL_COST_RATIO = 0.60
GOAL_POINTS = 1.0
GOAL_SHARE = 0.95


def say(message: str) -> None:
    print(message, flush=True)


def subset(items: list[sim.Item], per_group: int | None) -> list[sim.Item]:
    """The first ``per_group`` images of every group, in manifest order (all of them without a limit)."""
    if not per_group:
        return items
    taken: dict[str, int] = defaultdict(int)
    out = []
    for item in items:
        if taken[item.group] < per_group:
            taken[item.group] += 1
            out.append(item)
    return out


def table(found: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for arm, f in found.items():
        lines.append(f"\n[{arm}] test accuracy against cumulative annotation cost (expert 10 : crowd 1), mean ± sd")
        lines.append(f"{'policy':8s}{'budget':>8s}{'cost':>18s}{'test accuracy':>20s}{'seeds':>7s}")
        for policy in (f["baseline"], f["candidate"]):
            for p in f["curves"][policy]:
                cost, acc = p["cost"], p["accuracy"]
                lines.append(
                    f"{policy:8s}{p['budget']:>8d}{cost[0]:>10.0f} ± {cost[1]:<5.0f}{acc[0]:>12.3f} ± {acc[1]:.3f}"
                    f"{p['seeds']:>7d}"
                )
        ratio, points = f["cost_ratio"], f["points_at_equal_cost"]
        reach = (
            f"{f['candidate_cost_to_reach_baseline_final']:.0f} = {ratio:.0%} of today's {f['baseline_final_cost']:.0f}"
            if ratio is not None
            else "not reached"
        )
        met = "MET" if ratio is not None and ratio <= GOAL_COST_RATIO else "NOT MET"
        lines.append(f"new policy's cost to reach today's final {f['baseline_final_accuracy']:.3f}: {reach} "
                     f"(goal <= {GOAL_COST_RATIO:.0%}: {met})")  # fmt: skip
        shown = f"{points:+.2f} points" if points is not None else "-"
        met = "MET" if points is not None and points >= GOAL_POINTS else "NOT MET"
        lines.append(f"accuracy at equal cost {f['equal_cost']:.0f}: new - today = {shown} (goal >= +1: {met})")
        lines.append("consensus accuracy on each run's final votes (non-gold crowd-voted patches), mean ± sd:")
        lines.append(f"{'policy':8s}{'majority':>16s}{'platform (DS)':>16s}{'true confusion':>16s}{'share':>8s}")
        for policy, d in f["decoders"].items():
            a = d["accuracy"]
            share = d["share_of_true_gain"]
            cells = "".join(f"{a[k][0]:>9.4f} ± {a[k][1]:.3f}" for k in ("majority", "platform", "true_confusion"))
            lines.append(f"{policy:8s}{cells}{share if share is None else f'{share:.0%}':>8}")
        shares = [d["share_of_true_gain"] for d in f["decoders"].values() if d["share_of_true_gain"] is not None]
        met = "MET" if shares and min(shares) >= GOAL_SHARE else "NOT MET"
        lines.append(f"platform's share of the true decoder's gain over majority (goal >= {GOAL_SHARE:.0%}): {met}")
    lines.append("\nstudents' accuracy over their votes in a run (first / middle / last third), mean over runs:")
    for policy in ("today", "new"):
        thirds = [
            [s[i]["accuracy"] for r in runs if r["policy"] == policy for s in r["students"].values()] for i in range(3)
        ]
        votes = [s[0]["votes"] * 3 for r in runs if r["policy"] == policy for s in r["students"].values()]
        lines.append(
            f"  {policy:6s} "
            + " / ".join(f"{np.nanmean(t):.3f}" for t in thirds)
            + f"  ({np.mean(votes):.0f} votes each)"
        )
    return lines


def plot(found: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(found)), figsize=(6 * max(1, len(found)), 4.5), squeeze=False)
    for ax, (arm, f) in zip(axes[0], found.items(), strict=False):
        for policy in ("today", "new"):
            points = f["curves"][policy]
            cost = np.array([p["cost"][0] for p in points])
            mean = np.array([p["accuracy"][0] for p in points])
            sd = np.array([p["accuracy"][1] for p in points])
            xerr = np.array([p["cost"][1] for p in points])
            line = ax.errorbar(cost, mean, xerr=xerr, marker="o", capsize=2, label=policy)[0]
            ax.fill_between(cost, mean - sd, mean + sd, alpha=0.2, color=line.get_color())
        ax.set_xlabel("cumulative annotation cost (expert 10 : crowd 1)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{arm}: improving crowd, mean ± sd over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-group", type=int, help="first N images of each group (default: every image)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default="margin")
    parser.add_argument("--budgets", default="50,100,200,400")
    parser.add_argument("--gold-size", type=int, default=150)
    parser.add_argument("--learning-votes", type=int, default=sim.IMPROVING.learning_votes)
    parser.add_argument(
        "--new-training-labels", choices=("hard", "soft", "weighted"), default="weighted",
        help="what the new policy's rounds train on (today's: hard)",
    )  # fmt: skip
    parser.add_argument(
        "--new-setting", action="append", default=[], metavar="NAME=VALUE",
        help="a project setting of the new policy replaced for this run (repeatable), e.g. expert_routing=contested",
    )  # fmt: skip
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--json", type=Path, help="also write the figures (and every round's row) to this file")
    args = parser.parse_args()
    crowd = replace(sim.IMPROVING, learning_votes=args.learning_votes)
    new = sim.policy("new")
    labels = {**dict(new.fields), "training_labels": args.new_training_labels}
    labels.update(sim.parse_setting(text) for text in args.new_setting)
    new = replace(new, fields=sim.checked_fields(labels.items()))
    cfg = sim.Config(
        arms=tuple(args.arms.split(",")),
        seeds=tuple(range(args.seeds)),
        settings=(sim.with_policy(crowd, sim.policy("today")), sim.with_policy(crowd, new)),
        budgets=tuple(sorted(int(b) for b in args.budgets.split(","))),
        gold_size=args.gold_size,
        expert_cost=10.0,
        crowd_cost=1.0,
        extra_heads=False,
        run_tag=f"crowd-{args.tag}",
    )
    out = REPO / "bench-results" / f"crowd-policy-{args.tag}"
    started = time.monotonic()
    items = subset(sim.read_items(DATA / "manifest.csv"), args.per_group)
    source = sim.source_project(items, SOURCE_NAME, progress=say)
    say(f"source: {len(source)} distinct images of {len(items)} in {len(set(source.groups))} groups "
        f"({time.monotonic() - started:.0f}s)")  # fmt: skip
    t0 = time.monotonic()
    sim.source_embeddings(source, progress=say)
    say(f"embeddings ready ({time.monotonic() - t0:.0f}s); policies: "
        + "; ".join(f"{s.policy} = {dict(s.project)}" for s in cfg.settings))  # fmt: skip
    t0 = time.monotonic()
    rows, runs = sim.compare_policies(source, cfg, progress=say)
    loop = time.monotonic() - t0
    found = sim.policy_figures(rows, runs, cfg.arms)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = table(found, runs)
    lines.append(f"\n{len(runs)} runs, {len(rows)} rounds in {loop:.0f}s (total {time.monotonic() - started:.0f}s); "
                 f"load average {load} at the end")  # fmt: skip
    text = "\n".join(lines)
    say(text)
    out.mkdir(parents=True, exist_ok=True)
    learning_curves.write_csv(rows, out / "rounds.csv")
    plot(found, out / "cost_curve.png")
    (out / "summary.txt").write_text(text + "\n")
    say(f"wrote {out}")
    result = {
        "benchmark": "crowd_policy",
        "images": len(source),
        "seeds": len(cfg.seeds),
        "budgets": list(cfg.budgets),
        "policies": {s.policy: dict(s.project) for s in cfg.settings},
        "load_average": os.getloadavg(),
        "seconds": round(time.monotonic() - started),
        "arms": found,
    }
    if args.json:
        args.json.write_text(json.dumps({**result, "runs": runs, "rows": rows}, indent=2, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
