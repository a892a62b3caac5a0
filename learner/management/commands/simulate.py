"""manage.py simulate: the active-learning loop, headless, with simulated annotators (see learner.simulation)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from annotations.models import MAX_VOTE_COST, TrainingLabels
from learner import simulation as sim
from learner.core.strategies import STRATEGIES
from learner.simulation import learning_curves
from learner.simulation.annotators import LEARNING_CURVES


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


class Command(BaseCommand):
    help = (
        "Run the labelling loop with simulated annotators on a labelled image set (a folder of class folders, "
        "a CSV manifest with path,label,group columns, or a zip of either such as export_training_set writes) "
        "and compare query strategies with random."
    )

    def add_arguments(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument(
            "source", type=Path, help="Folder of class folders (CLASS/[GROUP/]image), a CSV, or a zip of either."
        )
        parser.add_argument("--path-column", default="path")
        parser.add_argument("--label-column", default="label")
        parser.add_argument("--group-column", default="group_id", help="Patient/slide/case column (CSV only).")
        parser.add_argument("--source-project", help="Name of the project every image is ingested into once.")
        parser.add_argument("--arms", type=_csv, default=sim.DEFAULT_ARMS, help="Comma-separated strategies.")
        parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (0..N-1).")
        parser.add_argument(
            "--labelling",
            type=_csv,
            default=("oracle", "noisy"),
            help="Who labels: oracle (a perfect expert), noisy (a crowd) and/or improving (students who get better "
            "with practice, --student-start to --student-end over --learning-votes votes; five by default).",
        )
        parser.add_argument(
            "--student-start", type=float, nargs=2, default=(0.5, 0.7), metavar=("LOW", "HIGH"),
            help="Improving: range of each student's per-class accuracy at their first vote.",
        )  # fmt: skip
        parser.add_argument(
            "--student-end", type=float, nargs=2, default=(0.8, 0.9), metavar=("LOW", "HIGH"),
            help="Improving: range of each student's per-class accuracy once learnt.",
        )  # fmt: skip
        parser.add_argument("--learning-votes", type=int, default=300, help="Improving: votes it takes to learn.")
        parser.add_argument("--learning-curve", choices=LEARNING_CURVES, default="linear")
        parser.add_argument(
            "--expert-accuracy", type=float, help="The expert's accuracy (default 1 for noisy, 0.95 for improving)."
        )
        parser.add_argument(
            "--policy",
            type=_csv,
            default=(),
            help=f"Labelling policies to compare on the crowd settings, run as setting-policy: "
            f"{', '.join(f'{p.name} ({p.description})' for p in sim.POLICIES.values())}.",
        )
        parser.add_argument(
            "--project-setting",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="Set a Project field on every simulated project (repeatable), e.g. votes_required=5; checked "
            "against the model. Not one a --policy sets.",
        )
        parser.add_argument("--budgets", default="50,100,200,400,750", help="Label counts to train at.")
        parser.add_argument("--test-fraction", type=float, default=0.2, help="Share of groups held out for test.")
        parser.add_argument("--gold-size", type=int, default=150, help="Expert gold/validation patches.")
        parser.add_argument(
            "--students", type=int, help="Crowd size (default 3 in the noisy setting, 5 in the improving one)."
        )
        parser.add_argument("--crowd-accuracy", type=float, nargs=2, default=(0.6, 0.85), metavar=("LOW", "HIGH"))
        parser.add_argument("--votes-required", type=int, default=3, help="Crowd votes per patch (noisy).")
        parser.add_argument(
            "--redundancy",
            type=_csv,
            default=("fixed",),
            help="Crowd policies to compare (noisy): fixed (votes-required votes on every patch) and/or adaptive "
            "(stop once the consensus is confident; votes-required is the cap), run as setting noisy-adaptive.",
        )
        parser.add_argument(
            "--redundancy-confidence", type=float, default=0.9, help="Adaptive: consensus confidence that stops."
        )
        parser.add_argument(
            "--routing",
            type=_csv,
            default=("contested",),
            help="Expert routing policies to compare (noisy): contested (crowd first, disputes to the expert) "
            "and/or value (straight to the expert where the crowd is a poor buy), the latter run as setting "
            "NAME-value (Project.expert_routing).",
        )
        parser.add_argument("--expert-cost", type=float, default=10.0, help="Relative cost of an expert vote.")
        parser.add_argument("--crowd-cost", type=float, default=1.0, help="Relative cost of a crowd vote.")
        parser.add_argument("--expert-rate", type=float, default=1.0, help="Share of contested patches reviewed.")
        parser.add_argument("--gold-rate", type=float, default=0.1, help="Share of crowd leases that are gold.")
        parser.add_argument("--random-fraction", type=float, default=0.0, help="In-batch random control share.")
        parser.add_argument(
            "--stratify",
            action="store_true",
            help="Keep every class in both the pool and the test set (grouped where the groups allow; a class "
            "living in one group is split by image, and the summary says so).",
        )
        parser.add_argument("--target", type=float, help="Accuracy to count labels to (default: random's final).")
        parser.add_argument("--out", type=Path, help="Output folder (default bench-results/simulate-TAG).")
        parser.add_argument("--tag", help="Names this run's projects and users (default: a timestamp).")
        parser.add_argument(
            "--no-extra-heads", action="store_true", help="Skip the plain-head (no self-training) analysis."
        )
        parser.add_argument(
            "--training-labels",
            choices=[c for c, _ in TrainingLabels.choices],
            default=TrainingLabels.HARD,
            help="What the rounds train on: the consensus labels (hard), their posteriors as soft targets (soft), "
            "or the labels weighted by their posterior (weighted).",
        )
        parser.add_argument(
            "--write-scores", action="store_true", help="Write the per-slide scores (SlideScores) as the web rounds do."
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            cfg = self.config(opts)
            out = opts["out"] or Path("bench-results") / f"simulate-{cfg.run_tag}"
            items = sim.read_items(
                opts["source"],
                path_column=opts["path_column"],
                label_column=opts["label_column"],
                group_column=opts["group_column"],
                extract_to=out / "source",
            )
        except (sim.SimulationError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        name = (
            opts["source_project"] or f"simulation source: {opts['source'].resolve().parent.name}/{opts['source'].name}"
        )
        say = self.stdout.write
        say(f"{len(items)} images in {len({i.group for i in items})} groups; source project {name!r}.")
        rounds = sim.RoundsCsv(out)
        started = time.monotonic()
        try:
            source = sim.source_project(items, name, progress=say)
            say(f"{len(source)} distinct images ingested; embedding (cached after the first pass)...")
            sim.source_embeddings(source, progress=say)
            sim.simulate(source, cfg, progress=say, on_row=rounds)
        except sim.SimulationError as exc:
            raise CommandError(str(exc)) from exc
        text = learning_curves.summary(rounds.rows, opts["target"])
        sim.write_summary(rounds.rows, out, text)
        say(text)
        elapsed = time.monotonic() - started
        n = len(rounds.rows)
        files = "rounds.csv, learning_curve.png, cost_curve.png and summary.txt"
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        say(f"\n{n} rounds in {elapsed:.0f}s (load average {load}); wrote {files} to {out}")

    def config(self, opts: dict[str, Any]) -> sim.Config:
        bad_arms = set(opts["arms"]) - set(STRATEGIES)
        if bad_arms:
            raise ValueError(f"Unknown arm(s) {', '.join(sorted(bad_arms))}; choose from {', '.join(STRATEGIES)}.")
        unknown = set(opts["labelling"]) - set(sim.SETTINGS)
        if unknown:
            raise ValueError(f"Unknown setting(s) {', '.join(sorted(unknown))}; use {', '.join(sim.SETTINGS)}.")
        crowd = {
            "votes_required": opts["votes_required"],
            "expert_rate": opts["expert_rate"],
            "gold_rate": opts["gold_rate"],
        }
        if opts["expert_accuracy"] is not None:
            if not 0 < opts["expert_accuracy"] <= 1:
                raise ValueError("--expert-accuracy must be above 0 and at most 1.")
            crowd["expert_accuracy"] = opts["expert_accuracy"]
        if opts["students"] is not None and opts["students"] < 1:
            raise ValueError("--students must be at least 1.")
        noisy = replace(
            sim.NOISY,
            students=opts["students"] or sim.NOISY.students,
            student_accuracy=tuple(opts["crowd_accuracy"]),
            **crowd,
        )
        for name in ("student_start", "student_end"):
            low, high = opts[name]
            if not 0 <= low <= high <= 1:
                raise ValueError(f"--{name.replace('_', '-')} takes LOW HIGH with 0 <= LOW <= HIGH <= 1.")
        if opts["learning_votes"] < 1:
            raise ValueError("--learning-votes must be at least 1.")
        improving = replace(
            sim.IMPROVING,
            students=opts["students"] or sim.IMPROVING.students,
            student_start=tuple(opts["student_start"]),
            student_end=tuple(opts["student_end"]),
            learning_votes=opts["learning_votes"],
            learning_curve=opts["learning_curve"],
            **crowd,
        )
        policies = set(opts["redundancy"])
        if not policies or policies - {"fixed", "adaptive"}:
            raise ValueError("--redundancy takes fixed and/or adaptive.")
        if not 0.5 <= opts["redundancy_confidence"] <= 1.0:
            raise ValueError("--redundancy-confidence must be between 0.5 and 1.")
        for name in ("expert_cost", "crowd_cost"):
            if not 0.001 <= opts[name] <= MAX_VOTE_COST:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0.001 and {MAX_VOTE_COST:g}.")
        adaptive = replace(
            noisy, name="noisy-adaptive", adaptive=True, redundancy_confidence=opts["redundancy_confidence"]
        )
        routings = tuple(opts["routing"])
        if not routings or set(routings) - {"contested", "value"}:
            raise ValueError("--routing takes contested and/or value.")
        if opts["policy"] and policies != {"fixed"}:
            raise ValueError("--policy sets the redundancy itself; leave out --redundancy.")
        if opts["policy"] and set(routings) != {"contested"}:
            raise ValueError("--policy sets the routing itself; leave out --routing.")
        chosen = [sim.policy(name) for name in opts["policy"]]
        extra = [sim.parse_setting(text) for text in opts["project_setting"]]
        settings: tuple[sim.Setting, ...] = ()
        for s in opts["labelling"]:
            if s == "oracle":
                crowds: tuple[sim.Setting, ...] = (sim.ORACLE,)
            elif s == "improving":
                crowds = (improving,)
            else:
                crowds = tuple(p for name, p in (("fixed", noisy), ("adaptive", adaptive)) if name in policies)
            if s != "oracle":
                crowds = tuple(
                    p if r == "contested" else replace(p, name=f"{p.name}-value", expert_routing="value")
                    for p in crowds
                    for r in routings
                )
            if chosen and s != "oracle":
                settings += tuple(sim.with_policy(c, p, extra) for c in crowds for p in chosen)
            else:
                settings += tuple(sim.with_settings(c, extra) for c in crowds)
        budgets = tuple(sorted(int(b) for b in _csv(opts["budgets"])))
        if not budgets or budgets[0] < 1:
            raise ValueError("Budgets must be positive label counts, e.g. 50,100,200.")
        return sim.Config(
            arms=opts["arms"],
            seeds=tuple(range(opts["seeds"])),
            settings=settings,
            budgets=budgets,
            test_fraction=opts["test_fraction"],
            gold_size=opts["gold_size"],
            random_fraction=opts["random_fraction"],
            write_scores=opts["write_scores"],
            extra_heads=not opts["no_extra_heads"],
            stratify=opts["stratify"],
            expert_cost=opts["expert_cost"],
            crowd_cost=opts["crowd_cost"],
            training_labels=str(opts["training_labels"]),
            run_tag=opts["tag"] or time.strftime("%Y%m%d-%H%M%S"),
        )
