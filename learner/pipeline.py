"""One training round, stage by stage: snapshot → embed → train → evaluate → score → select → publish.

The ML lives in ``learner.core`` (no Django); this module loads rows, feeds patches to it and
saves the results. Everything a round produces (model version, scores, new tasks, the round's
final state) is written in one transaction at the end, so a round that is cancelled, fails or
loses its worker leaves the previous model and the queue exactly as they were.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.db import transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from annotations import consensus, queue
from annotations.models import AnnotationTask, Consensus, LabelClass, Patch, Project
from annotations.slides import tiles
from learner.core.backbone import create_backbone
from learner.core.classifier import Classifier, save_model
from learner.core.config import BackboneSpec, TrainConfig
from learner.core.data import LazyImages
from learner.core.embeddings import embed
from learner.core.errors import Cancelled, LearnerError
from learner.core.evaluation import evaluate
from learner.core.strategies import cold_start, select_batch
from learner.core.training import finetune, self_train_head, train_head

from .conf import LearnerSettings, learner_settings
from .events import broadcast, round_payload
from .models import ModelVersion, PatchScore, TrainingRound

logger = logging.getLogger(__name__)
State = TrainingRound.State

# Share of the progress bar each stage takes (start, end).
STAGES = {
    "snapshot": (0, 5),
    "embed": (5, 60),
    "train": (60, 78),
    "evaluate": (78, 82),
    "score": (82, 90),
    "select": (90, 95),
    "publish": (95, 100),
}
FINAL_LABEL_STATUSES = (Consensus.Status.AGREED, Consensus.Status.EXPERT)
# An expert gold set at least this large (in two classes or more) becomes the validation set and is kept
# out of training: it is a fixed yardstick across rounds, where a split of the labels would shift with them.
MIN_GOLD_FOR_VALIDATION = 30


class RoundFailed(Exception):
    """A round that cannot go on; the message is shown to the admin as is."""


@dataclass
class Pool:
    """Every patch of the project's ready slides, in a fixed order, with what the round knows of it."""

    patch_ids: np.ndarray
    patches: list[Patch]
    labels: dict[int, int]  # patch id -> class index (final consensus only)
    groups: list[str]  # split unit per patch: slide group, else slide, else spatial block
    split_unit: str
    arms: dict[int, str] = field(default_factory=dict)  # patch id -> arm that chose it


class RoundReporter:
    """Progress to the round row (heartbeat) and the project's websocket group; cancellation checks."""

    def __init__(self, round_: TrainingRound, min_interval: float = 0.5) -> None:
        self.round = round_
        self.min_interval = min_interval
        self._last_write = 0.0
        self._last_check = 0.0
        self._stage = ""
        self.timings: dict[str, float] = {}
        self._stage_started = time.monotonic()

    def _close_stage(self) -> None:
        now = time.monotonic()
        if self._stage:
            self.timings[self._stage] = round(self.timings.get(self._stage, 0.0) + now - self._stage_started, 3)
        self._stage_started = now

    def stage(self, name: str) -> None:
        self._close_stage()
        self._stage = name
        self.progress(name, 0.0, force=True)

    def finish_timing(self) -> None:
        self._close_stage()
        self._stage = ""

    def progress(self, stage: str, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < self.min_interval:
            return
        start, end = STAGES.get(self._stage or stage, (0, 100))
        percent = start + (end - start) * min(1.0, max(0.0, fraction))
        self._last_write = now
        fields = {"stage": self._stage or stage, "progress": percent, "heartbeat_at": timezone.now()}
        TrainingRound.objects.filter(pk=self.round.pk).update(**fields)
        for key, value in fields.items():
            setattr(self.round, key, value)
        broadcast(self.round.project_id, round_payload(self.round))

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < 1.0:
            return False
        self._last_check = now
        return TrainingRound.objects.filter(pk=self.round.pk, cancel_requested=True).exists()

    def core_progress(self) -> Callable[[str, float], None]:
        return lambda stage, fraction: self.progress(stage, fraction)


def patch_key(patch: Patch) -> str:
    """Embedding cache key: the slide's content and the patch geometry, so identical pixels share it."""
    return f"{patch.slide.checksum}:{patch.x}:{patch.y}:{patch.size}:{patch.project.patch_size}"


def patch_images(patches: list[Patch]) -> LazyImages:
    return LazyImages(lambda i: tiles.read_patch(patches[i]), len(patches))


def _split_units(patches: list[Patch], block: int = 4) -> tuple[list[str], str]:
    """Split by slide group, else by slide; a single slide is split into spatial blocks of patches."""
    if len({p.slide.group for p in patches if p.slide.group}) >= 2 and all(p.slide.group for p in patches):
        return [p.slide.group for p in patches], "group"
    if len({p.slide_id for p in patches}) >= 2:
        return [f"slide-{p.slide_id}" for p in patches], "slide"
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


def platform_head(
    x: np.ndarray,
    y: np.ndarray,
    unlabelled: np.ndarray,
    class_names: list[str],
    backbone: Any,
    config: TrainConfig,
    cfg: LearnerSettings,
    *,
    image_size: int | None = None,
    progress: Any = None,
    should_stop: Any = None,
) -> Classifier:
    """The head-mode model a round deploys: self-trained on the unlabelled embeddings when
    LEARNER SELF_TRAINING is on, else the plain head on the labels."""
    if cfg.SELF_TRAINING:
        return self_train_head(
            x, y, unlabelled, class_names, backbone, config, threshold=cfg.SELF_TRAINING_THRESHOLD,
            image_size=image_size, tta=cfg.TTA, progress=progress, should_stop=should_stop,
        )  # fmt: skip
    return train_head(
        x, y, class_names, backbone, config, image_size=image_size, tta=cfg.TTA, progress=progress,
        should_stop=should_stop,
    )  # fmt: skip


def split_by_group(
    labelled: np.ndarray, groups: list[str], labels: np.ndarray, fraction: float, seed: int
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


def gold_validation(pool: Pool, labelled: np.ndarray, y_all: np.ndarray) -> np.ndarray:
    """The labelled gold patches (pool indices) when there are enough to validate on, else none."""
    gold = np.array([i for i in labelled if pool.patches[i].is_gold], dtype=np.int64)
    if len(gold) < MIN_GOLD_FOR_VALIDATION or len(np.unique(y_all[gold])) < 2:
        return np.array([], dtype=np.int64)
    return gold


def _arm_metrics(
    emb: np.ndarray,
    pool: Pool,
    train: np.ndarray,
    val: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    backbone: Any,
    config: TrainConfig,
    strategy: str,
) -> dict[str, Any]:
    """The live control: a head trained only on the random arm's labels vs one on as many strategy labels."""
    arm_of = np.array([pool.arms.get(int(pool.patch_ids[i]), "") for i in train])
    random_idx = train[arm_of == "random"]
    strategy_idx = train[(arm_of != "random") & (arm_of != "")]
    n = min(len(random_idx), len(strategy_idx))
    if n < 4 or len(val) == 0:
        return {}
    rng = np.random.default_rng(config.seed)
    strategy_idx = rng.choice(strategy_idx, size=n, replace=False)
    random_idx = rng.choice(random_idx, size=n, replace=False)
    out: dict[str, Any] = {}
    for arm, idx in (("strategy", strategy_idx), ("random", random_idx)):
        if len(np.unique(y[idx])) < 2:
            continue
        clf = train_head(emb[idx], y[idx], class_names, backbone, config)
        m = evaluate(y[val], clf.predict_proba(emb[val]), class_names)
        out[arm] = {
            "n_labels": int(n),
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "roc_auc": m.get("roc_auc"),
            "strategy": strategy if arm == "strategy" else "random",
        }
    return out


def run_round(round_id: int, *, settings: LearnerSettings | None = None, write_scores: bool = True) -> TrainingRound:
    """Execute a queued round. Safe to call twice: only a queued round is started.

    ``write_scores=False`` skips the PatchScore rows (one per pool patch per round): the simulator does
    not read them, and at thousands of patches they are the slowest write of a round.
    """
    cfg = settings or learner_settings()
    claimed = TrainingRound.objects.filter(pk=round_id, state=State.QUEUED).update(
        state=State.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now(), stage="snapshot"
    )
    round_ = TrainingRound.objects.select_related("project").get(pk=round_id)
    if not claimed:
        return round_  # already running elsewhere, finished, or cancelled while queued
    reporter = RoundReporter(round_)
    weights_file: Path | None = None
    try:
        weights_file = _execute(round_, reporter, cfg, write_scores)
    except Cancelled:
        _finish(round_, State.CANCELLED, "", reporter)
        _remove(weights_file)
    except (RoundFailed, LearnerError) as exc:
        _finish(round_, State.FAILED, str(exc), reporter)
        _remove(weights_file)
    except BaseException as exc:
        logger.exception("Round %s failed", round_id)
        message = (
            "The round hit its time limit."
            if exc.__class__.__name__ == "SoftTimeLimitExceeded"
            else (f"The round failed unexpectedly ({exc.__class__.__name__}: {exc}); the previous model is unchanged.")
        )
        _finish(round_, State.FAILED, message, reporter)
        _remove(getattr(exc, "weights_file", None))
        if not isinstance(exc, Exception):
            raise
    return TrainingRound.objects.get(pk=round_id)


def _remove(path: Path | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _finish(round_: TrainingRound, state: str, error: str, reporter: RoundReporter) -> None:
    reporter.finish_timing()
    TrainingRound.objects.filter(pk=round_.pk, state=State.RUNNING).update(
        state=state, error=error, finished_at=timezone.now(), stage=state, timings=reporter.timings
    )
    round_.refresh_from_db()
    broadcast(round_.project_id, round_payload(round_, "round.finished"))


def _execute(round_: TrainingRound, reporter: RoundReporter, cfg: LearnerSettings, write_scores: bool) -> Path | None:
    project = round_.project
    class_names = list(LabelClass.objects.filter(project=project).order_by("order").values_list("name", flat=True))
    if len(class_names) < 2:
        raise RoundFailed("The project needs at least two label classes before a round can train.")

    reporter.stage("snapshot")
    pool = snapshot(project, class_names)
    if not pool.patches:
        raise RoundFailed("The project has no patches yet; add slides and wait until they are ready.")
    labelled = np.array([i for i, pid in enumerate(pool.patch_ids) if int(pid) in pool.labels], dtype=np.int64)
    y_all = np.array([pool.labels.get(int(pid), -1) for pid in pool.patch_ids], dtype=np.int64)

    reporter.stage("embed")
    spec = BackboneSpec(name=project.backbone, weights=cfg.PRETRAINED, multiscale=cfg.MULTISCALE)
    backbone = create_backbone(spec)
    size = project.patch_size if project.patch_size <= 256 else 224
    emb = embed(
        backbone,
        patch_images(pool.patches),
        keys=[patch_key(p) for p in pool.patches],
        cache_dir=cfg.CACHE_DIR / "embeddings",
        image_size=size,
        batch_size=cfg.EMBED_BATCH_SIZE,
        tta=cfg.TTA,
        device=cfg.DEVICE,
        progress=reporter.core_progress(),
        should_stop=reporter.should_stop,
    )
    unlabelled = np.array([i for i in range(len(pool.patches)) if y_all[i] < 0], dtype=np.int64)
    gold_val = gold_validation(pool, labelled, y_all)
    trainable = np.setdiff1d(labelled, gold_val)
    n_classes_seen = len(np.unique(y_all[trainable])) if len(trainable) else 0
    config = TrainConfig(mode=project.train_mode, image_size=size, seed=project.seed + round_.number, device=cfg.DEVICE)

    def fit_head(x: np.ndarray, y: np.ndarray, progress: Any = None) -> Classifier:
        return platform_head(
            x, y, emb[unlabelled], class_names, backbone, config, cfg,
            image_size=size, progress=progress, should_stop=reporter.should_stop,
        )  # fmt: skip

    if len(trainable) < cfg.MIN_LABELS or n_classes_seen < 2:
        # Cold start: no model worth trusting yet, so spread the first batch over the embedding space.
        reporter.stage("select")
        picks = (
            cold_start(
                emb[unlabelled],
                min(project.batch_size, len(unlabelled)),
                random_fraction=project.random_fraction,
                rng=config.seed,
                should_stop=reporter.should_stop,
            )
            if len(unlabelled)
            else []
        )
        chosen = [(int(pool.patch_ids[unlabelled[s.index]]), s.arm) for s in picks]
        reporter.stage("publish")
        _publish(
            round_,
            project,
            None,
            [],
            chosen,
            {
                "cold_start": True,
                "n_labels": len(labelled),
                "reason": f"{len(trainable)} final labels in {n_classes_seen} classes; training needs "
                f"{cfg.MIN_LABELS} in at least 2.",
            },
            reporter,
            len(labelled),
        )
        return None

    reporter.stage("train")
    split_unit = pool.split_unit
    if len(gold_val):
        train_idx, val_idx, split_unit = trainable, gold_val, "gold"
    else:
        train_idx, val_idx = split_by_group(labelled, pool.groups, y_all, cfg.VALIDATION_FRACTION, config.seed)
    if len(val_idx) == 0 or len(np.unique(y_all[train_idx])) < 2:
        train_idx, val_idx = labelled, np.array([], dtype=np.int64)
    clf: Classifier
    if project.train_mode == "finetune":
        result = finetune(
            spec,
            patch_images([pool.patches[i] for i in train_idx]),
            y_all[train_idx],
            class_names,
            config,
            val_images=patch_images([pool.patches[i] for i in val_idx]) if len(val_idx) else None,
            val_labels=y_all[val_idx] if len(val_idx) else None,
            progress=reporter.core_progress(),
            should_stop=reporter.should_stop,
        )
        clf = result.classifier
    else:
        clf = fit_head(emb[train_idx], y_all[train_idx], progress=reporter.core_progress())

    reporter.stage("evaluate")
    metrics: dict[str, Any] = {
        "n_labels": len(labelled),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "split": split_unit,
        "train_mode": project.train_mode,
    }
    if len(val_idx):
        val_proba = _predict(clf, emb, val_idx, pool, cfg, reporter)
        metrics.update(evaluate(y_all[val_idx], val_proba, class_names))
        if project.train_mode == "head":
            metrics["arms"] = _arm_metrics(
                emb, pool, train_idx, val_idx, y_all, class_names, backbone, config, project.query_strategy
            )
    else:
        metrics["note"] = "Too few groups to hold any out; no validation metrics this round."
    if project.train_mode == "head" and len(val_idx) and not len(gold_val):
        # Deploy a head refitted on every label (seconds); the metrics above are the held-out estimate.
        # (Gold validation patches are never trained on, so that model is already the deployed one.)
        clf = fit_head(emb[labelled], y_all[labelled])
        metrics["deployed"] = "refit on all labels"

    reporter.stage("score")
    proba = _predict(clf, emb, np.arange(len(pool.patches)), pool, cfg, reporter)

    reporter.stage("select")
    picks = (
        select_batch(
            project.query_strategy,
            min(project.batch_size, len(unlabelled)),
            proba=proba[unlabelled],
            embeddings=emb[unlabelled],
            labelled_embeddings=emb[labelled],
            random_fraction=project.random_fraction,
            rng=config.seed,
            should_stop=reporter.should_stop,
        )
        if len(unlabelled)
        else []
    )
    chosen = [(int(pool.patch_ids[unlabelled[s.index]]), s.arm) for s in picks]

    reporter.stage("publish")
    weights_dir = cfg.WEIGHTS_DIR / f"project-{project.pk}"
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights_file = weights_dir / f"round-{round_.number}-{uuid.uuid4().hex[:8]}.pt"
    save_model(weights_file, clf, extra={"round": round_.number, "project": project.pk})
    scores = [(int(pid), proba[i]) for i, pid in enumerate(pool.patch_ids)]
    try:
        _publish(
            round_,
            project,
            (clf, weights_file, pool, class_names),
            scores,
            chosen,
            metrics,
            reporter,
            len(labelled),
            write_scores=write_scores,
        )
    except BaseException as exc:
        exc.weights_file = weights_file  # type: ignore[attr-defined]
        raise
    return weights_file


def _predict(
    clf: Classifier, emb: np.ndarray, idx: np.ndarray, pool: Pool, cfg: LearnerSettings, reporter: RoundReporter
) -> np.ndarray:
    if clf.mode == "head":
        return clf.predict_proba(emb[idx])
    return clf.predict_proba(
        patch_images([pool.patches[i] for i in idx]),
        device=cfg.DEVICE,
        progress=reporter.core_progress(),
        should_stop=reporter.should_stop,
    )


def _uncertainty(p: np.ndarray) -> float:
    top = np.sort(p)[::-1]
    return float(1.0 - (top[0] - (top[1] if len(top) > 1 else 0.0)))


def _publish(
    round_: TrainingRound,
    project: Project,
    model: tuple[Classifier, Path, Pool, list[str]] | None,
    scores: list[tuple[int, np.ndarray]],
    chosen: list[tuple[int, str]],
    metrics: dict[str, Any],
    reporter: RoundReporter,
    n_labels: int,
    *,
    write_scores: bool = True,
) -> None:
    """Write everything the round produced at once, unless it was cancelled meanwhile."""
    if reporter.should_stop() or TrainingRound.objects.filter(pk=round_.pk, cancel_requested=True).exists():
        raise Cancelled("Cancelled before publishing.")
    arms = dict(chosen)
    with transaction.atomic():
        locked = TrainingRound.objects.select_for_update().get(pk=round_.pk)
        if locked.state != State.RUNNING or locked.cancel_requested:
            raise Cancelled("Cancelled before publishing.")
        version = None
        if model is not None:
            _clf, weights_file, pool, class_names = model
            version = ModelVersion.objects.create(
                project=project,
                round=locked,
                backbone=project.backbone,
                train_mode=project.train_mode,
                weights_path=str(weights_file),
                class_names=class_names,
                strategy=project.query_strategy,
                label_snapshot={str(pid): class_names[c] for pid, c in pool.labels.items()},
                metrics=metrics,
                n_labels=n_labels,
            )
            if write_scores:
                PatchScore.objects.bulk_create(
                    [
                        PatchScore(
                            model_version=version,
                            patch_id=pid,
                            probs=[round(float(v), 5) for v in p],
                            uncertainty=_uncertainty(p),
                            predicted=int(np.argmax(p)),
                        )
                        for pid, p in scores
                    ],
                    batch_size=2000,
                )
        # Tasks not chosen this round fall below the new batch, ordered by the new model's uncertainty.
        rest = {pid: _uncertainty(p) for pid, p in scores} if model is not None else None
        queue.publish_round(project, round_id=locked.pk, chosen=chosen, rest_priority=rest, round_number=locked.number)
        consensus.send_contested_to_experts(project, round_id=locked.pk)
        metrics["selected"] = {"n": len(chosen), "arms": _count(arms.values())}
        locked.state = State.SUCCEEDED
        locked.stage = State.SUCCEEDED
        locked.progress = 100.0
        locked.n_labels = n_labels
        locked.metrics = metrics
        locked.timings = {**reporter.timings}
        locked.finished_at = timezone.now()
        locked.save()
        pid = project.pk
        transaction.on_commit(lambda: broadcast(pid, round_payload(locked, "round.finished")))
        transaction.on_commit(lambda: broadcast(pid, {"type": "queue.refresh", "round": locked.pk}))
    # The publish stage's own time (its writes included) is known only once they are committed.
    reporter.finish_timing()
    TrainingRound.objects.filter(pk=round_.pk).update(timings=reporter.timings)
    round_.refresh_from_db()


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
