"""Smoke version of tests/bench/bench_crowd_policy.py: today's policy against the new one, with students who
improve, end to end through the platform's loop on a small LC25000 pool."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from annotations.models import AnnotationTask, Consensus, Patch, Project, Slide, Vote
from learner import simulation as sim
from learner.management.commands.simulate import Command
from learner.models import TrainingRound
from tests.conftest import LC25000_DIR
from tests.integration.lc25000 import image_path, manifest_rows

pytestmark = pytest.mark.skipif(not (LC25000_DIR / "manifest.csv").is_file(), reason="LC25000 data not present")

LEARNING_VOTES = 5
# Students who start worse than chance and are perfect after LEARNING_VOTES votes: whether they improved can
# be read off their votes exactly.
CROWD = replace(
    sim.IMPROVING,
    students=3,
    student_start=(0.2, 0.2),
    student_end=(1.0, 1.0),
    learning_votes=LEARNING_VOTES,
    gold_rate=0.1,
)
BUDGETS = (12,)  # one labelling round per policy: the cold start, then the final round


@pytest.fixture(autouse=True)
def own_weights_dir(settings: Any, tmp_path: Path) -> None:
    settings.LEARNER = {**settings.LEARNER, "WEIGHTS_DIR": str(tmp_path / "models")}


@pytest.fixture
def source(db: None) -> sim.SourceSet:
    items = [
        sim.Item(path=image_path(row), label=row["_class"], group=row["group_id"])
        for row in manifest_rows(per_class=24, groups_per_class=6)
    ]
    return sim.source_project(items, "sim source")


def test_both_policies_run_end_to_end_and_the_figures_are_computed_on_the_runs_own_votes(
    source: sim.SourceSet,
) -> None:
    cfg = sim.Config(
        arms=("margin",),
        seeds=(0,),
        settings=(sim.with_policy(CROWD, sim.policy("today")), sim.with_policy(CROWD, sim.policy("new"))),
        budgets=BUDGETS,
        test_fraction=0.3,
        gold_size=6,
        gold_per_group=2,
        extra_heads=False,
        expert_cost=10.0,
        crowd_cost=1.0,
        run_tag="cp",
    )
    rows, runs = sim.compare_policies(source, cfg)

    assert {r["policy"] for r in runs} == {"today", "new"}
    for run in runs:
        project = Project.objects.get(pk=run["project"])
        new = run["policy"] == "new"
        # The policy reached the project, and its rounds trained the way it says.
        assert project.adaptive_redundancy is project.redundancy_model_prior is new
        assert project.training_labels == ("weighted" if new else "hard")
        # The rounds left the model's posterior on the crowd tasks they queued (what the new policy weighs).
        assert AnnotationTask.objects.filter(
            project=project, round__isnull=False, model_posterior__isnull=False
        ).exists()
        last = TrainingRound.objects.filter(project=project).order_by("-number").first()
        assert last is not None and last.metrics["training_labels"] == project.training_labels
        # Costs are the votes the loop asked for, priced at 10 : 1 (the up-front gold set not counted).
        final = [r for r in rows if r["project"] == project.pk][-1]
        crowd = Vote.objects.filter(project=project, role="crowd").count()
        assert crowd > 0 and final["crowd_votes"] == crowd
        assert final["cost"] == crowd + 10.0 * final["expert_votes"]
        # The students improved across their own votes: every vote from the LEARNING_VOTES-th on is right,
        # and the early ones are not all right.
        truth = {pid: source.class_names[source.labels[row]] for pid, row in _row_of(project, source).items()}
        late, early = [], []
        for v in Vote.objects.filter(project=project, role="crowd").order_by("annotator_id", "id"):
            (late if _index_of(v, project) >= LEARNING_VOTES else early).append(truth[v.patch_id] == v.label.name)
        assert late and all(late)
        assert early and not all(early)
        thirds = run["students"]
        assert len(thirds) == 3 and all(t[-1]["accuracy"] >= t[0]["accuracy"] for t in thirds.values())
        # The decoders saw the run's active crowd votes on its non-gold patches, no more, no fewer.
        decoders = run["decoders"]
        gold = set(Patch.objects.filter(project=project, is_gold=True).values_list("pk", flat=True))
        active = Vote.objects.filter(project=project, role="crowd", is_active=True).exclude(patch_id__in=gold)
        assert decoders["crowd_votes"] == active.count()
        assert decoders["patches"] == active.values("patch_id").distinct().count()
        acc = decoders["accuracy"]
        assert all(0.0 <= acc[k] <= 1.0 for k in ("majority", "platform", "true_confusion"))
        gain = acc["true_confusion"] - acc["majority"]
        if gain > 0:
            assert decoders["share_of_true_gain"] == pytest.approx((acc["platform"] - acc["majority"]) / gain)
        else:
            assert decoders["share_of_true_gain"] is None
        # "platform" is the consensus the platform stores after its batch recompute (Dawid-Skene).
        assert decoders["method"] == "dawid_skene"
        assert Consensus.objects.filter(project=project, method="dawid_skene").exists()

    found = sim.policy_figures(rows, runs, cfg.arms)
    figures = json.loads(json.dumps(found))["margin"]
    assert set(figures["curves"]) == {"today", "new"}
    for points in figures["curves"].values():
        assert points and {p["budget"] for p in points} <= set(BUDGETS)
        assert all(p["cost"][0] > 0 and 0 <= p["accuracy"][0] <= 1 for p in points)
    assert figures["baseline_final_cost"] == figures["curves"]["today"][-1]["cost"][0]
    if figures["cost_ratio"] is not None:
        need = figures["candidate_cost_to_reach_baseline_final"]
        assert figures["cost_ratio"] == pytest.approx(need / figures["baseline_final_cost"])
    assert figures["equal_cost"] <= figures["baseline_final_cost"]
    assert figures["points_at_equal_cost"] is None or abs(figures["points_at_equal_cost"]) <= 100
    for policy in ("today", "new"):
        mine = [r["decoders"]["accuracy"]["platform"] for r in runs if r["policy"] == policy]
        assert figures["decoders"][policy]["accuracy"]["platform"][0] == pytest.approx(np.mean(mine))


def _row_of(project: Project, source: sim.SourceSet) -> dict[int, int]:
    """{patch id: source row}: the run project's slides are copies of the source's (same checksums)."""
    row_of_slide = {int(slide): row for row, slide in enumerate(source.slide_ids)}
    row_of_checksum = {
        checksum: row_of_slide[pk]
        for pk, checksum in Slide.objects.filter(pk__in=list(row_of_slide)).values_list("pk", "checksum")
    }
    pairs = Patch.objects.filter(project=project).values_list("pk", "slide__checksum")
    return {pid: row_of_checksum[checksum] for pid, checksum in pairs}


def _index_of(vote: Vote, project: Project) -> int:
    """The vote's index among its annotator's votes in the project (the order they were cast)."""
    return Vote.objects.filter(project=project, annotator_id=vote.annotator_id, id__lt=vote.pk).count()


def test_the_command_builds_the_improving_crowd_under_each_policy_and_refuses_unknown_fields(
    db: None, tmp_path: Path
) -> None:
    command = Command()
    parser = command.create_parser("manage.py", "simulate")
    opts = vars(
        parser.parse_args(
            ["x.csv", "--labelling=improving", "--policy=today,new", "--learning-votes=50", "--expert-accuracy=0.9",
             "--project-setting", "gold_rate=0.2", "--student-start", "0.55", "0.6"]
        )
    )  # fmt: skip
    cfg = command.config(opts)
    assert [s.name for s in cfg.settings] == ["improving-today", "improving-new"]
    for setting in cfg.settings:
        assert setting.improving and setting.students == 5 and setting.learning_votes == 50
        assert setting.student_start == (0.55, 0.6) and setting.expert_accuracy == 0.9
        assert dict(setting.project)["gold_rate"] == 0.2
    assert dict(cfg.settings[1].project)["adaptive_redundancy"] is True
    manifest = tmp_path / "none.csv"
    for bad, message in [
        ("--project-setting=expert_routing_by_magic=value", "no field 'expert_routing_by_magic'"),
        ("--project-setting=expert_routing=value", "sets expert_routing itself"),
        ("--project-setting=training_labels=fuzzy", "not a valid choice"),
        ("--project-setting=adaptive_redundancy=false", "sets adaptive_redundancy itself"),
        ("--policy=tomorrow", "Unknown policy"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command(
                "simulate", str(manifest), "--labelling=improving", "--policy=today,new", bad, f"--out={tmp_path}"
            )
    assert not Project.objects.exists()
