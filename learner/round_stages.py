"""The stages of a training round, each a function of plain data: snapshot → embed → split → train → evaluate
→ score → select.

Each stage takes what earlier stages returned (a Pool, embedding and probability arrays, a LabelSplit, a
Classifier) and the round's RoundSetup (the project's choices, the settings, the progress and cancel
callbacks), and returns arrays, a Classifier or a metrics dict. Only ``snapshot`` touches the database (it
recomputes consensus and reads the labels); nothing here writes what the round produces. ``learner.pipeline``
runs the stages in order and publishes their output in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db.models import OuterRef, Subquery

from annotations import consensus
from annotations.models import AnnotationTask, Consensus, Patch, Project
from learner.core.backbone import Backbone
from learner.core.classifier import Classifier
from learner.core.config import TrainConfig
from learner.core.errors import ProgressFn, StopFn
from learner.core.evaluation import evaluate
from learner.core.strategies import cold_start, select_batch
from learner.core.training import finetune, self_train_head, train_head

from .conf import LearnerSettings
from .embedding import embed_patches, image_size, patch_images

FINAL_LABEL_STATUSES = (Consensus.Status.AGREED, Consensus.Status.EXPERT)
# An expert gold set at least this large (in two classes or more) becomes the validation set and is kept
# out of training: it is a fixed yardstick across rounds, where a split of the labels would shift with them.
MIN_GOLD_FOR_VALIDATION = 30
# On a single slide the split unit is a square of this many patches a side, so neighbours stay together.
SPATIAL_BLOCK = 4


@dataclass(frozen=True)
class RoundSetup:
    """What every stage reads besides the earlier stages' output: the project's choices for this round."""

    class_names: list[str]
    train_mode: str
    strategy: str
    batch_size: int
    random_fraction: float
    config: TrainConfig
    settings: LearnerSettings
    progress: ProgressFn | None = None
    should_stop: StopFn | None = None

    @classmethod
    def of(
        cls,
        project: Project,
        round_number: int,
        class_names: list[str],
        settings: LearnerSettings,
        *,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> RoundSetup:
        config = TrainConfig(
            mode=project.train_mode,
            image_size=image_size(project.patch_size),
            seed=project.seed + round_number,
            device=settings.DEVICE,
        )
        return cls(
            class_names=class_names,
            train_mode=project.train_mode,
            strategy=project.query_strategy,
            batch_size=project.batch_size,
            random_fraction=project.random_fraction,
            config=config,
            settings=settings,
            progress=progress,
            should_stop=should_stop,
        )


@dataclass
class Pool:
    """Every patch of the project's ready slides, in a fixed order, with what the round knows of it."""

    patch_ids: np.ndarray
    patches: list[Patch]
    labels: dict[int, int]  # patch id -> class index (final consensus only)
    groups: list[str]  # split unit per patch: slide group, else slide, else spatial block
    split_unit: str
    arms: dict[int, str] = field(default_factory=dict)  # patch id -> arm that chose it
    y: np.ndarray = field(init=False)  # class index per pool patch, -1 where unlabelled
    labelled: np.ndarray = field(init=False)  # pool indices with a label
    unlabelled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.y = np.array([self.labels.get(int(pid), -1) for pid in self.patch_ids], dtype=np.int64)
        self.labelled = np.flatnonzero(self.y >= 0).astype(np.int64)
        self.unlabelled = np.flatnonzero(self.y < 0).astype(np.int64)


@dataclass(frozen=True)
class LabelSplit:
    """Which labelled pool patches (pool indices) a round trains on and which it validates on."""

    train: np.ndarray
    val: np.ndarray
    unit: str  # what was held out whole: "gold", "group", "slide" or "spatial block"
    gold: bool  # the validation set is the expert gold set, never trained on


# --- snapshot ------------------------------------------------------------------------------------------------------


def _split_units(patches: list[Patch]) -> tuple[list[str], str]:
    """Split by slide group, else by slide; a single slide is split into spatial blocks of patches."""
    if len({p.slide.group for p in patches if p.slide.group}) >= 2 and all(p.slide.group for p in patches):
        return [p.slide.group for p in patches], "group"
    if len({p.slide_id for p in patches}) >= 2:
        return [f"slide-{p.slide_id}" for p in patches], "slide"
    block = SPATIAL_BLOCK
    return [f"block-{p.x // (p.size * block)}-{p.y // (p.size * block)}" for p in patches], "spatial block"


def snapshot(project: Project, class_names: list[str]) -> Pool:
    """Recompute consensus (iterative methods run here) and take the labels as they are now.

    Votes cast after this point are used by the next round.
    """
    consensus.recompute_project_consensus(project)
    latest_arm = AnnotationTask.objects.filter(patch=OuterRef("pk"), kind=AnnotationTask.Kind.CROWD).order_by("-id")
    patches = list(
        Patch.objects.filter(project=project, slide__status="ready")
        .select_related("slide", "project")
        .annotate(arm=Subquery(latest_arm.values("arm")[:1]))
        .order_by("id")
    )
    index = {name: i for i, name in enumerate(class_names)}
    labels = {
        pid: index[name]
        for pid, name in Consensus.objects.filter(
            project=project, status__in=FINAL_LABEL_STATUSES, label__isnull=False
        ).values_list("patch_id", "label__name")
    }
    groups, unit = _split_units(patches)
    return Pool(
        patch_ids=np.array([p.pk for p in patches], dtype=np.int64),
        patches=patches,
        labels=labels,
        groups=groups,
        split_unit=unit,
        arms={p.pk: p.arm for p in patches if getattr(p, "arm", "")},
    )


# --- embed ---------------------------------------------------------------------------------------------------------


def embed_pool(pool: Pool, backbone: Backbone, setup: RoundSetup) -> np.ndarray:
    return embed_patches(pool.patches, backbone, setup.settings, progress=setup.progress, should_stop=setup.should_stop)


# --- split ---------------------------------------------------------------------------------------------------------


def gold_validation(pool: Pool) -> np.ndarray:
    """The labelled gold patches (pool indices) when there are enough to validate on, else none."""
    gold = np.array([i for i in pool.labelled if pool.patches[i].is_gold], dtype=np.int64)
    if len(gold) < MIN_GOLD_FOR_VALIDATION or len(np.unique(pool.y[gold])) < 2:
        return np.array([], dtype=np.int64)
    return gold


def too_few_labels(pool: Pool, settings: LearnerSettings) -> str | None:
    """Why the round cannot train yet (a cold start), or None when it can."""
    trainable = np.setdiff1d(pool.labelled, gold_validation(pool))
    n_classes_seen = len(np.unique(pool.y[trainable])) if len(trainable) else 0
    if len(trainable) >= settings.MIN_LABELS and n_classes_seen >= 2:
        return None
    return (
        f"{len(trainable)} final labels in {n_classes_seen} classes; training needs "
        f"{settings.MIN_LABELS} in at least 2."
    )


def split_by_group(
    labelled: np.ndarray, groups: list[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (never single patches) until about ``fraction`` of the labels are held out.

    ``labelled`` are pool indices. Returns (train indices, validation indices).
    """
    rng = np.random.default_rng(seed)
    unit_of = np.array([groups[i] for i in labelled])
    units = np.unique(unit_of)
    rng.shuffle(units)
    target = max(1, round(fraction * len(labelled)))
    held: list[str] = []
    count = 0
    for unit in units:
        if count >= target or len(held) == len(units) - 1:
            break
        held.append(unit)
        count += int((unit_of == unit).sum())
    val_mask = np.isin(unit_of, held)
    return labelled[~val_mask], labelled[val_mask]


def split_labels(pool: Pool, setup: RoundSetup) -> LabelSplit:
    """Validate on the gold set when there is one, else on whole held-out groups; no validation when the
    groups are too few to hold any out with two classes left to train on."""
    gold = gold_validation(pool)
    if len(gold):
        return LabelSplit(train=np.setdiff1d(pool.labelled, gold), val=gold, unit="gold", gold=True)
    fraction, seed = setup.settings.VALIDATION_FRACTION, setup.config.seed
    train, val = split_by_group(pool.labelled, pool.groups, fraction, seed)
    if len(val) == 0 or len(np.unique(pool.y[train])) < 2:
        train, val = pool.labelled, np.array([], dtype=np.int64)
    return LabelSplit(train=train, val=val, unit=pool.split_unit, gold=False)


# --- train ---------------------------------------------------------------------------------------------------------


def platform_head(
    x: np.ndarray,
    y: np.ndarray,
    unlabelled: np.ndarray,
    class_names: list[str],
    backbone: Backbone,
    config: TrainConfig,
    settings: LearnerSettings,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Classifier:
    """The head-mode model a round deploys: self-trained on the unlabelled embeddings when
    LEARNER SELF_TRAINING is on, else the plain head on the labels."""
    if settings.SELF_TRAINING:
        return self_train_head(
            x, y, unlabelled, class_names, backbone, config, threshold=settings.SELF_TRAINING_THRESHOLD,
            tta=settings.TTA, progress=progress, should_stop=should_stop,
        )  # fmt: skip
    return train_head(x, y, class_names, backbone, config, tta=settings.TTA, progress=progress, should_stop=should_stop)


def _fit_head(
    pool: Pool, emb: np.ndarray, idx: np.ndarray, backbone: Backbone, setup: RoundSetup, *, progress: bool
) -> Classifier:
    return platform_head(
        emb[idx], pool.y[idx], emb[pool.unlabelled], setup.class_names, backbone, setup.config, setup.settings,
        progress=setup.progress if progress else None, should_stop=setup.should_stop,
    )  # fmt: skip


def train(pool: Pool, emb: np.ndarray, split: LabelSplit, backbone: Backbone, setup: RoundSetup) -> Classifier:
    """A head on the embeddings, or the whole network fine-tuned on the pixels (project.train_mode)."""
    if setup.train_mode != "finetune":
        return _fit_head(pool, emb, split.train, backbone, setup, progress=True)
    has_val = len(split.val) > 0
    result = finetune(
        backbone.spec,
        patch_images([pool.patches[i] for i in split.train]),
        pool.y[split.train],
        setup.class_names,
        setup.config,
        val_images=patch_images([pool.patches[i] for i in split.val]) if has_val else None,
        val_labels=pool.y[split.val] if has_val else None,
        progress=setup.progress,
        should_stop=setup.should_stop,
    )
    return result.classifier


def refit_for_deployment(
    pool: Pool, emb: np.ndarray, split: LabelSplit, backbone: Backbone, setup: RoundSetup
) -> Classifier | None:
    """In head mode with labels held out: a head refitted on every label (seconds), which the round deploys,
    while the held-out metrics stand as its estimate. None when the trained model is the one to deploy
    (fine-tuning; no hold-out; gold validation, whose patches are never trained on)."""
    if setup.train_mode != "head" or not len(split.val) or split.gold:
        return None
    return _fit_head(pool, emb, pool.labelled, backbone, setup, progress=False)


# --- evaluate, score -----------------------------------------------------------------------------------------------


def predict(clf: Classifier, pool: Pool, emb: np.ndarray, idx: np.ndarray, setup: RoundSetup) -> np.ndarray:
    """Probabilities for the pool patches ``idx``: from the embeddings for a head, from the pixels otherwise."""
    if clf.mode == "head":
        return clf.predict_proba(emb[idx])
    return clf.predict_proba(
        patch_images([pool.patches[i] for i in idx]),
        device=setup.settings.DEVICE,
        progress=setup.progress,
        should_stop=setup.should_stop,
    )


def arm_metrics(
    pool: Pool, emb: np.ndarray, split: LabelSplit, backbone: Backbone, setup: RoundSetup
) -> dict[str, Any]:
    """The live control: a head trained only on the random arm's labels vs one on as many strategy labels."""
    train_idx, val, y = split.train, split.val, pool.y
    arm_of = np.array([pool.arms.get(int(pool.patch_ids[i]), "") for i in train_idx])
    random_idx = train_idx[arm_of == "random"]
    strategy_idx = train_idx[(arm_of != "random") & (arm_of != "")]
    n = min(len(random_idx), len(strategy_idx))
    if n < 4 or len(val) == 0:
        return {}
    rng = np.random.default_rng(setup.config.seed)
    strategy_idx = rng.choice(strategy_idx, size=n, replace=False)
    random_idx = rng.choice(random_idx, size=n, replace=False)
    out: dict[str, Any] = {}
    for arm, idx in (("strategy", strategy_idx), ("random", random_idx)):
        if len(np.unique(y[idx])) < 2:
            continue
        clf = train_head(emb[idx], y[idx], setup.class_names, backbone, setup.config)
        m = evaluate(y[val], clf.predict_proba(emb[val]), setup.class_names)
        out[arm] = {
            "n_labels": int(n),
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "roc_auc": m.get("roc_auc"),
            "strategy": setup.strategy if arm == "strategy" else "random",
        }
    return out


def evaluate_model(
    clf: Classifier, pool: Pool, emb: np.ndarray, split: LabelSplit, backbone: Backbone, setup: RoundSetup
) -> dict[str, Any]:
    """The round's metrics: sizes and split, and the held-out scores when labels were held out."""
    metrics: dict[str, Any] = {
        "n_labels": len(pool.labelled),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "split": split.unit,
        "train_mode": setup.train_mode,
    }
    if not len(split.val):
        metrics["note"] = "Too few groups to hold any out; no validation metrics this round."
        return metrics
    metrics.update(evaluate(pool.y[split.val], predict(clf, pool, emb, split.val, setup), setup.class_names))
    if setup.train_mode == "head":
        metrics["arms"] = arm_metrics(pool, emb, split, backbone, setup)
    return metrics


def score(clf: Classifier, pool: Pool, emb: np.ndarray, setup: RoundSetup) -> np.ndarray:
    """The model's probabilities for every pool patch, (pool, classes)."""
    return predict(clf, pool, emb, np.arange(len(pool.patches)), setup)


# --- select --------------------------------------------------------------------------------------------------------


def select(pool: Pool, emb: np.ndarray, proba: np.ndarray | None, setup: RoundSetup) -> list[tuple[int, str]]:
    """The next batch as (patch id, arm), best first: by the project's strategy over the model's
    probabilities, or, with no model yet (``proba=None``, a cold start), spread over the embedding space."""
    unlabelled = pool.unlabelled
    if not len(unlabelled):
        return []
    n = min(setup.batch_size, len(unlabelled))
    seed = setup.config.seed
    if proba is None:
        picks = cold_start(
            emb[unlabelled], n, random_fraction=setup.random_fraction, rng=seed, should_stop=setup.should_stop
        )
    else:
        picks = select_batch(
            setup.strategy,
            n,
            proba=proba[unlabelled],
            embeddings=emb[unlabelled],
            labelled_embeddings=emb[pool.labelled],
            random_fraction=setup.random_fraction,
            rng=seed,
            should_stop=setup.should_stop,
        )
    return [(int(pool.patch_ids[unlabelled[s.index]]), s.arm) for s in picks]
