"""What a simulation reports: each round's model measured on the run's held-out test images (a row of
rounds.csv), and the files a simulation leaves in its output folder (rounds.csv after every round, the
learning-curve plot and summary.txt; the curves and the summary themselves are learning_curves')."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db.models import Q
from sklearn.metrics import f1_score

from annotations.models import Role, Vote
from annotations.stats import annotation_cost
from learner.core.classifier import load_model
from learner.core.config import TrainConfig
from learner.core.evaluation import evaluate
from learner.core.training import train_head
from learner.models import ModelVersion, TrainingRound

from . import learning_curves

if TYPE_CHECKING:
    from .runs import Run


def votes_paid(run: Run) -> dict[str, int]:
    """The votes the loop asked for, by role, from the pool project's votes (corrected and undone ones
    included: they were paid for). The expert's up-front gold set is left out: it is the same for every run."""
    votes = Vote.objects.filter(project=run.project)
    up_front = Q(role=Role.EXPERT, task__isnull=True, patch_id__in=run.gold_ids)
    return {
        "crowd": votes.filter(role=Role.CROWD).count(),
        "expert": votes.exclude(role=Role.CROWD).exclude(up_front).count(),
    }


def held_out_metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """The test columns of a rounds.csv row."""
    m = evaluate(y, proba, class_names)
    return {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": float(f1_score(y, proba.argmax(1), average="macro", labels=range(len(class_names)))),
        "auc": m["roc_auc_ovr"],
    }


def supervised_only(run: Run, rows: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a plain head on the same labels, without the platform's self-training on the
    unlabelled pool (analysis: what self-training adds)."""
    emb, backbone = run.source.embeddings, run.source.backbone
    assert emb is not None and backbone is not None
    head = train_head(emb[rows], y, run.source.class_names, backbone, TrainConfig(seed=run.split.seed))
    test = run.split.test_rows
    proba = head.predict_proba(emb[test])
    return held_out_metrics(run.source.labels[test], proba, run.source.class_names)["accuracy"]  # type: ignore[return-value]


def round_row(
    run: Run, round_: TrainingRound, budget: int | None, votes: int, seconds: float, final: bool, heads: bool
) -> dict[str, Any]:
    """One CSV row: the round's ModelVersion (loaded from its weights file) on the test images."""
    version = ModelVersion.objects.get(round=round_)
    names = version.class_names
    snapshot = {int(pid): names.index(label) for pid, label in version.label_snapshot.items()}
    trained = sorted(pid for pid in snapshot if pid not in run.gold_ids)
    rows = np.array([run.row_of[pid] for pid in trained], dtype=np.int64)
    y = np.array([snapshot[pid] for pid in trained], dtype=np.int64)
    emb = run.source.embeddings
    assert emb is not None
    test = run.split.test_rows
    proba = load_model(version.weights_path).predict_proba(emb[test])
    paid = votes_paid(run)
    row: dict[str, Any] = {
        "setting": run.setting.name,
        "policy": run.setting.policy,
        "arm": run.arm,
        "training_labels": run.project.training_labels,
        "seed": run.split.seed,
        "round": round_.number,
        "budget": budget,
        "labels": len(trained),
        "votes": votes,
        "crowd_votes": paid["crowd"],
        "expert_votes": paid["expert"],
        "cost": annotation_cost(run.project, crowd_votes=paid["crowd"], expert_votes=paid["expert"]),
        "expert_cost": run.project.expert_cost,
        "crowd_cost": run.project.crowd_cost,
        **{f"test_{k}": v for k, v in held_out_metrics(run.source.labels[test], proba, names).items()},
        "consensus_accuracy": float((y == run.source.labels[rows]).mean()) if len(rows) else None,
        # Distinct groups among the labels: uncertainty sampling can spend a batch on near-copies.
        "label_groups": len(set(run.source.groups[rows].tolist())),
        "val_accuracy": round_.metrics.get("accuracy"),
        "val_split": round_.metrics.get("split"),
        "round_seconds": round(seconds, 2),
        "split_warnings": " | ".join(run.split.warnings),
        "project": run.project.pk,
        "round_id": round_.pk,
    }
    if heads and final:  # the final round only
        row["acc_supervised_only"] = supervised_only(run, rows, y)
    return row


class RoundsCsv:
    """rounds.csv in ``out``, rewritten after every round so that a run stopped half-way keeps its rows.
    Called with each row (``simulate(on_row=...)``); ``rows`` holds them all."""

    def __init__(self, out: Path) -> None:
        self.path = out / "rounds.csv"
        self.rows: list[dict[str, Any]] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        learning_curves.write_csv(self.rows, self.path)


def write_summary(rows: list[dict[str, Any]], out: Path, text: str) -> None:
    """The learning-curve plot of ``rows`` and ``text`` (the summary) beside rounds.csv."""
    learning_curves.plot(rows, out / "learning_curve.png")
    learning_curves.plot_cost(rows, out / "cost_curve.png")
    (out / "summary.txt").write_text(text + "\n")
