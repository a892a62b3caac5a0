"""The simulator runs the platform's own loop (leases, votes, consensus, rounds) on real LC25000 patches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from annotations.models import AnnotationTask, Patch, Vote
from learner import simulation as sim
from learner.models import ModelVersion, TrainingRound
from learner.simulation import learning_curves
from tests.conftest import LC25000_DIR
from tests.integration.lc25000 import image_path, manifest_rows

pytestmark = pytest.mark.skipif(not (LC25000_DIR / "manifest.csv").is_file(), reason="LC25000 data not present")


def small_items() -> list[sim.Item]:
    """72 images, 24 per class from 6 groups per class (18 groups in all)."""
    return [
        sim.Item(path=image_path(row), label=row["_class"], group=row["group_id"])
        for row in manifest_rows(per_class=24, groups_per_class=6)
    ]


def tiny_config(**changes: Any) -> sim.Config:
    config = sim.Config(
        arms=("margin", "random"),
        seeds=(0,),
        settings=(sim.ORACLE,),
        budgets=(9, 18),
        test_fraction=0.3,
        gold_size=0,
        extra_heads=False,
        run_tag="t",
    )
    return replace(config, **changes)


@pytest.fixture(autouse=True)
def own_weights_dir(settings: Any, tmp_path: Path) -> None:
    """Model files of rolled-back projects must not sit where a later test's project (same id) looks."""
    settings.LEARNER = {**settings.LEARNER, "WEIGHTS_DIR": str(tmp_path / "models")}


@pytest.fixture
def source(db: None) -> sim.SourceSet:
    return sim.source_project(small_items(), "sim source")


@pytest.mark.django_db
def test_every_arm_runs_its_rounds_through_the_real_services_and_beats_chance(source: sim.SourceSet) -> None:
    rows = sim.simulate(source, tiny_config())

    assert {(r["arm"], r["budget"]) for r in rows} == {("margin", 9), ("margin", 18), ("random", 9), ("random", 18)}
    for arm in ("margin", "random"):
        project_rounds = TrainingRound.objects.filter(project__name=f"sim t oracle {arm} seed 0")
        assert [r.state for r in project_rounds.order_by("number")] == ["succeeded"] * 3  # cold start + 2
        project = project_rounds.first().project  # type: ignore[union-attr]
        assert ModelVersion.objects.filter(project=project).count() == 2
        task_arms = set(AnnotationTask.objects.filter(project=project).values_list("arm", flat=True))
        assert arm in task_arms
        assert Vote.objects.filter(project=project).count() == 18
        # The test groups never reach the pool project.
        split = sim.split_rows(source, tiny_config(), 0)
        test_groups = set(source.groups[split.test_rows])
        assert not test_groups & set(Patch.objects.filter(project=project).values_list("slide__group", flat=True))
    # The margin arm starts from the platform's diverse cold start; random stays random throughout.
    margin_arms = set(
        AnnotationTask.objects.filter(project__name="sim t oracle margin seed 0").values_list("arm", flat=True)
    )
    assert margin_arms == {"cold_start_kmeans", "margin"}
    final = [r for r in rows if r["budget"] == 18]
    assert all(r["labels"] == 18 and r["consensus_accuracy"] == 1.0 for r in final)
    assert np.mean([r["test_accuracy"] for r in final]) > 0.6  # three classes: chance is 1/3


@pytest.mark.django_db
def test_a_noisy_crowd_votes_three_times_per_patch_and_the_expert_settles_disputes(source: sim.SourceSet) -> None:
    noisy = sim.Setting("noisy", students=3, student_accuracy=(0.6, 0.7), votes_required=3, gold_rate=0.0)
    rows = sim.simulate(source, tiny_config(arms=("entropy",), settings=(noisy,), budgets=(12,)))

    project = TrainingRound.objects.get(project__name="sim t noisy entropy seed 0", number=2).project
    crowd_votes = Vote.objects.filter(project=project, role="crowd")
    assert crowd_votes.values("annotator").distinct().count() == 3
    assert crowd_votes.count() >= 3 * 12
    # The crowd's work reached the budget; the round's batch Dawid-Skene consensus (at its snapshot) may
    # re-open a few 2-1 splits as contested, so it can train on a few labels less than were counted.
    assert rows[-1]["budget"] == 12 and 6 <= rows[-1]["labels"] <= 12
    assert 0.0 <= rows[-1]["consensus_accuracy"] <= 1.0
    # Patches the crowd split on went to the expert, whose vote settled them (the final round's batch
    # consensus may open new expert tasks; no round follows to work them).
    final_round = TrainingRound.objects.get(project=project, number=2)
    expert_tasks = AnnotationTask.objects.filter(project=project, kind="expert", created_at__lt=final_round.started_at)
    assert expert_tasks.exists()
    assert all(t.state == "done" for t in expert_tasks)


def test_the_command_writes_rows_a_plot_and_a_summary(db: None, tmp_path: Path) -> None:
    manifest = tmp_path / "patches.csv"
    lines = ["file,diagnosis,patient"] + [f"{i.path},{i.label},{i.group}" for i in small_items()]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    call_command(
        "simulate", str(manifest), "--path-column=file", "--label-column=diagnosis", "--group-column=patient",
        "--arms=margin,random", "--seeds=1", "--labelling=oracle", "--budgets=9,18", "--gold-size=0",
        "--test-fraction=0.3", "--no-extra-heads", f"--out={out}", "--tag=cmd",
    )  # fmt: skip
    assert (out / "rounds.csv").read_text().count("\n") == 1 + 4
    assert (out / "learning_curve.png").stat().st_size > 10_000
    assert "labels to reach" in (out / "summary.txt").read_text()


@pytest.mark.django_db
def test_adaptive_redundancy_pays_fewer_crowd_votes_per_label_and_every_row_has_its_cost(source: sim.SourceSet) -> None:
    fixed = sim.Setting("noisy", students=3, student_accuracy=(0.6, 0.8), votes_required=3, gold_rate=0.0)
    adaptive = replace(fixed, name="noisy-adaptive", adaptive=True, redundancy_confidence=0.9)
    cfg = tiny_config(arms=("random",), settings=(fixed, adaptive), budgets=(12,), expert_cost=10.0, crowd_cost=1.0)
    rows = sim.simulate(source, cfg)

    final = {r["setting"]: r for r in rows if r["budget"] == 12}
    assert set(final) == {"noisy", "noisy-adaptive"}
    for setting, row in final.items():
        project = TrainingRound.objects.get(pk=row["round_id"]).project
        assert project.adaptive_redundancy is (setting == "noisy-adaptive")
        # The cost is the votes the loop asked for, priced at the project's costs (the gold set is not counted).
        crowd = Vote.objects.filter(project=project, role="crowd").count()
        assert row["crowd_votes"] == crowd and row["cost"] == crowd * 1.0 + row["expert_votes"] * 10.0
    name = "sim t noisy-adaptive random seed 0"
    tasks = AnnotationTask.objects.filter(project__name=name, kind="crowd", state="done")
    assert tasks.filter(votes_received=2).exists()  # settled by two agreeing students
    assert not tasks.filter(votes_received__gt=3).exists()  # never past the cap
    per_label = {s: r["crowd_votes"] / max(1, r["labels"]) for s, r in final.items()}
    assert per_label["noisy-adaptive"] < per_label["noisy"]
    text = learning_curves.summary(rows)
    assert "against annotation cost (expert 10 : crowd 1" in text and "noisy-adaptive" in text


def test_the_command_compares_policies_by_cost_on_a_stratified_split(db: None, tmp_path: Path) -> None:
    manifest = tmp_path / "patches.csv"
    lines = ["path,label,group_id"] + [f"{i.path},{i.label},{i.group}" for i in small_items()]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    call_command(
        "simulate", str(manifest), "--arms=random", "--seeds=1", "--labelling=noisy", "--budgets=9",
        "--redundancy=fixed,adaptive", "--expert-cost=8", "--crowd-cost=2", "--gold-size=0", "--gold-rate=0",
        "--test-fraction=0.3", "--stratify", "--no-extra-heads", f"--out={out}", "--tag=cost",
    )  # fmt: skip
    text = (out / "summary.txt").read_text()
    assert "against annotation cost (expert 8 : crowd 2" in text
    assert "noisy-adaptive" in text and "WARNING" not in text  # stratified: every class on both sides
    assert (out / "cost_curve.png").stat().st_size > 10_000
    with pytest.raises(CommandError, match="--expert-cost"):
        call_command("simulate", str(manifest), "--expert-cost=0", f"--out={out}")
    with pytest.raises(CommandError, match="--redundancy"):
        call_command("simulate", str(manifest), "--redundancy=sometimes", f"--out={out}")


def test_soft_labels_reach_the_simulated_projects_and_their_rounds(source: sim.SourceSet) -> None:
    noisy = sim.Setting("noisy", students=3, student_accuracy=(0.6, 0.7), votes_required=3, gold_rate=0.0)
    rows = sim.simulate(
        source, tiny_config(arms=("random",), settings=(noisy,), budgets=(12,), training_labels="weighted")
    )
    assert rows and {r["training_labels"] for r in rows} == {"weighted"}
    round_ = TrainingRound.objects.get(pk=rows[-1]["round_id"])
    assert round_.project.training_labels == "weighted" and round_.metrics["training_labels"] == "weighted"


def test_the_command_refuses_an_unknown_training_labels_value(db: None, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="training-labels"):
        call_command("simulate", str(tmp_path / "none.csv"), "--training-labels=fuzzy")
    assert not TrainingRound.objects.exists()


def test_value_routing_reaches_the_simulated_projects_and_sends_a_poor_crowd_s_patches_to_the_expert(
    source: sim.SourceSet, tmp_path: Path
) -> None:
    poor = sim.Setting(
        "noisy-value", students=3, student_accuracy=(0.35, 0.45), votes_required=3, expert_routing="value"
    )
    rows = sim.simulate(source, tiny_config(arms=("random",), settings=(poor,), budgets=(9, 18)))
    project = TrainingRound.objects.get(pk=rows[-1]["round_id"]).project
    assert project.expert_routing == "value" and project.reliability_fit.n_votes > 0
    routed = AnnotationTask.objects.filter(project=project, kind="expert", round__isnull=False)
    assert routed.exists() and all(t.route_reason.startswith("expert: crowd expected right") for t in routed)
    with pytest.raises(CommandError, match="--routing"):
        call_command("simulate", str(tmp_path / "none.csv"), "--routing=cheapest", f"--out={tmp_path}")
