"""One training round, stage by stage: snapshot → embed → train → evaluate → score → select → publish.

The ML lives in ``learner.core`` (no Django) and the stages in ``learner.round_stages`` (functions of plain
data); this module claims a queued round, runs the stages in order (``_execute`` is that list), and
publishes what they produced. Everything a round produces (model version, scores, new tasks, the round's
final state) is written in one transaction at the end, so a round that is cancelled, fails or loses its
worker leaves the previous model and the queue exactly as they were. A round that does not publish also
leaves no weights file: ``RoundRun`` holds the file it wrote and ``run_round`` removes it.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.utils import timezone

from annotations import queue
from annotations.models import LabelClass, Project
from annotations.speed import trained_label_modes
from learner.core.classifier import Classifier, save_model
from learner.core.errors import Cancelled, LearnerError
from learner.core.strategies import margin

from . import maps, scores, similar
from .conf import LearnerSettings, learner_settings
from .embedding import project_backbone, store_for
from .events import broadcast, round_payload
from .layout import Layout
from .models import ModelVersion, TrainingRound
from .reporter import RoundReporter
from .round_stages import (
    RoundSetup,
    embed_pool,
    evaluate_model,
    refit_for_deployment,
    score,
    select,
    snapshot,
    split_labels,
    too_few_labels,
    train,
)

logger = logging.getLogger(__name__)
State = TrainingRound.State
# The queue's tail (as many tasks as the batch) is looked for among this many of the new model's most
# uncertain patches; below this pool size that is every patch, as before.
TAIL_CANDIDATES = 50_000


class RoundFailed(Exception):
    """A round that cannot go on; the message is shown to the admin as is."""


@dataclass(frozen=True)
class TrainedModel:
    """A round's new model and what it says about the pool."""

    classifier: Classifier
    patch_ids: np.ndarray  # the pool, in the order of ``proba``'s rows
    slide_ids: np.ndarray  # each pool patch's slide
    proba: np.ndarray  # (pool, classes)
    labels: dict[int, int]  # the labels it was trained on: patch id -> class index

    @property
    def uncertainty(self) -> np.ndarray:
        """1 - (top-1 minus top-2 probability) per pool patch: what the queue ranks by."""
        return margin(self.proba)

    def posteriors_of(self, patch_ids: list[int]) -> np.ndarray:
        """The model's probabilities for these pool patches, (len(patch_ids), classes), in their order (what
        value routing weighs; annotations.expert_routing)."""
        wanted = np.asarray(patch_ids, dtype=np.int64)
        order = np.argsort(self.patch_ids, kind="stable")
        at = (
            order[np.minimum(np.searchsorted(self.patch_ids, wanted, sorter=order), len(order) - 1)]
            if len(wanted)
            else wanted
        )
        if len(wanted) and not (self.patch_ids[at] == wanted).all():
            raise ValueError("A chosen patch is not in the round's pool.")
        return self.proba[at]

    def most_uncertain(self, n: int) -> dict[int, float]:
        """Uncertainty of the ``n`` most uncertain pool patches (all of them when the pool is smaller),
        patch id -> score: the candidates for the queue's tail, which takes the most uncertain of them
        that still have an open task. A pool of any size hands over a bounded dict."""
        u = self.uncertainty
        top = np.arange(len(u)) if len(u) <= n else np.argpartition(-u, n - 1)[:n]
        return dict(zip(self.patch_ids[top].tolist(), u[top].tolist(), strict=True))


@dataclass
class RoundResult:
    """What a round publishes: its next batch, its metrics and, unless it was a cold start, its model."""

    chosen: list[tuple[int, str]]  # (patch id, arm), best first
    metrics: dict[str, Any]
    n_labels: int
    class_names: list[str]
    model: TrainedModel | None = None
    layout: tuple[Layout, float] | None = None  # a new map of the pool and its seconds (None: the stored one stands)


@dataclass
class RoundRun:
    """One execution of a claimed round: its row, its reporter, the settings, and the weights file it has
    written. The file is the run's until the publish commits (then it is the ModelVersion's); ``run_round``
    removes it when the round ends any other way."""

    round: TrainingRound
    reporter: RoundReporter
    settings: LearnerSettings
    write_scores: bool = True
    weights_file: Path | None = None
    on_publish: list[Callable[[], None]] = field(default_factory=list)  # run inside the publish transaction

    def discard_weights(self) -> None:
        if self.weights_file is not None:
            self.weights_file.unlink(missing_ok=True)
            self.weights_file = None


def run_round(round_id: int, *, write_scores: bool = True) -> TrainingRound:
    """Execute a queued round. Safe to call twice: only a queued round is started.

    ``write_scores=False`` skips the SlideScores rows (one per slide of the pool): the simulator, whose
    every image is a slide of its own, does not read them.
    """
    claimed = TrainingRound.objects.filter(pk=round_id, state=State.QUEUED).update(
        state=State.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now(), stage="snapshot"
    )
    round_ = TrainingRound.objects.select_related("project").get(pk=round_id)
    if not claimed:
        return round_  # already running elsewhere, finished, or cancelled while queued
    run = RoundRun(round_, RoundReporter(round_), learner_settings(), write_scores)
    try:
        _execute(run)
    except Cancelled:
        _finish(run, State.CANCELLED, "")
    except (RoundFailed, LearnerError) as exc:
        _finish(run, State.FAILED, str(exc))
    except SoftTimeLimitExceeded:
        logger.exception("Round %s hit its time limit", round_id)
        _finish(run, State.FAILED, "The round hit its time limit.")
    except BaseException as exc:
        logger.exception("Round %s failed", round_id)
        message = f"The round failed unexpectedly ({exc.__class__.__name__}: {exc}); the previous model is unchanged."
        _finish(run, State.FAILED, message)
        if not isinstance(exc, Exception):
            raise
    return TrainingRound.objects.get(pk=round_id)


def _finish(run: RoundRun, state: str, error: str) -> None:
    """End a round that did not publish: its state and error on the row, its weights file gone."""
    run.discard_weights()
    round_, reporter = run.round, run.reporter
    reporter.finish_timing()
    TrainingRound.objects.filter(pk=round_.pk, state=State.RUNNING).update(
        state=state, error=error, finished_at=timezone.now(), stage=state, timings=reporter.timings
    )
    round_.refresh_from_db()
    broadcast(round_.project_id, round_payload(round_, "round.finished"))


def _execute(run: RoundRun) -> None:
    project, reporter, cfg = run.round.project, run.reporter, run.settings
    class_names = list(LabelClass.objects.filter(project=project).order_by("order").values_list("name", flat=True))
    if len(class_names) < 2:
        raise RoundFailed("The project needs at least two label classes before a round can train.")
    setup = RoundSetup.of(
        project, run.round.number, class_names, cfg, progress=reporter.progress, should_stop=reporter.should_stop
    )

    reporter.stage("snapshot")
    pool = snapshot(project, class_names)
    if not len(pool):
        raise RoundFailed("The project has no patches yet; add slides and wait until they are ready.")
    # How the labels just taken were made (votes per mode), for the dashboard's share of each mode.
    label_modes = trained_label_modes(project)

    reporter.stage("embed")
    backbone = project_backbone(project, cfg)
    setup = setup.for_backbone(backbone, project.patch_size)
    embedding_stats: dict[str, Any] = {}
    emb = embed_pool(pool, backbone, project.backbone, setup, embedding_stats, project.backbone_weights)
    if run.write_scores:  # the simulator writes no scores and needs no "more like this" either
        store = store_for(backbone, project.patch_size, cfg)
        # Sent when the round publishes (on commit): the cpu worker builds the index from the store.
        run.on_publish.append(lambda: similar.schedule_build(project.pk, store.model_id, store.dim))

    reason = too_few_labels(pool, cfg)
    if reason is not None:
        # Cold start: no model worth trusting yet, so spread the first batch over the embedding space.
        reporter.stage("select")
        chosen = select(pool, emb, None, setup)
        layout = _map(run, pool, emb)
        reporter.stage("publish")
        metrics = {"cold_start": True, "n_labels": len(pool.labelled), "reason": reason, "embedding": embedding_stats}
        metrics["label_provenance"] = label_modes
        publish(run, RoundResult(chosen, metrics, len(pool.labelled), class_names, layout=layout))
        return

    reporter.stage("train")
    split = split_labels(pool, setup)
    clf = train(pool, emb, split, backbone, setup)

    reporter.stage("evaluate")
    metrics = evaluate_model(clf, pool, emb, split, backbone, setup)
    metrics["embedding"] = embedding_stats
    metrics["label_provenance"] = label_modes
    refit = refit_for_deployment(pool, emb, split, backbone, setup)
    if refit is not None:
        clf, metrics["deployed"] = refit, "refit on all labels"

    reporter.stage("score")
    proba = score(clf, pool, emb, setup)

    reporter.stage("select")
    chosen = select(pool, emb, proba, setup)
    layout = _map(run, pool, emb)

    reporter.stage("publish")
    model = TrainedModel(
        classifier=clf, patch_ids=pool.patch_ids, slide_ids=pool.slide_ids, proba=proba, labels=pool.labels
    )
    publish(run, RoundResult(chosen, metrics, len(pool.labelled), class_names, model, layout))


def _map(run: RoundRun, pool: Any, emb: Any) -> tuple[Layout, float] | None:
    """The ``map`` stage: the pool's 2-D layout for the embedding map (learner.maps), skipped when the
    stored map is of the same pool, LEARNER MAP_IN_ROUNDS is off, or the round writes no scores."""
    if not (run.settings.MAP_IN_ROUNDS and run.write_scores):  # the simulator reads neither
        return None
    run.reporter.stage("map")
    project = run.round.project
    return maps.map_stage(project, pool, emb, run.settings, run.reporter.progress, run.reporter.should_stop)


def _save_weights(run: RoundRun, clf: Classifier) -> Path:
    project_id, number = run.round.project_id, run.round.number
    folder = run.settings.WEIGHTS_DIR / f"project-{project_id}"
    folder.mkdir(parents=True, exist_ok=True)
    # Recorded before writing, so a write that fails half-way is removed too.
    run.weights_file = folder / f"round-{number}-{uuid.uuid4().hex[:8]}.pt"
    save_model(run.weights_file, clf, extra={"round": number, "project": project_id})
    return run.weights_file


def _save_version(
    round_: TrainingRound,
    project: Project,
    result: RoundResult,
    model: TrainedModel,
    weights_file: Path,
    *,
    write_scores: bool,
) -> ModelVersion:
    names = result.class_names
    version = ModelVersion.objects.create(
        project=project,
        round=round_,
        backbone=project.backbone,
        train_mode=project.train_mode,
        weights_path=str(weights_file),
        class_names=names,
        strategy=project.query_strategy,
        label_snapshot={str(pid): names[c] for pid, c in model.labels.items()},
        metrics=result.metrics,
        n_labels=result.n_labels,
    )
    if write_scores:
        scores.write(version, model.patch_ids, model.slide_ids, model.proba)
    return version


def publish(run: RoundRun, result: RoundResult) -> None:
    """Write everything the round produced at once, unless it was cancelled meanwhile."""
    round_, project, reporter, model = run.round, run.round.project, run.reporter, result.model
    if reporter.should_stop() or TrainingRound.objects.filter(pk=round_.pk, cancel_requested=True).exists():
        raise Cancelled("Cancelled before publishing.")
    weights_file = _save_weights(run, model.classifier) if model is not None else None
    with transaction.atomic():
        locked = TrainingRound.objects.select_for_update().get(pk=round_.pk)
        if locked.state != State.RUNNING or locked.cancel_requested:
            raise Cancelled("Cancelled before publishing.")
        rest = None
        version = None
        if model is not None and weights_file is not None:
            version = _save_version(locked, project, result, model, weights_file, write_scores=run.write_scores)
            # The most uncertain open tasks not chosen this round come next, below the new batch.
            rest = model.most_uncertain(TAIL_CANDIDATES)
        if result.layout is not None:
            maps.save(project, *result.layout, version)
        queue.publish_round(
            project,
            round_id=locked.pk,
            chosen=result.chosen,
            rest_priority=rest,
            round_number=locked.number,
            proba=model.posteriors_of([pid for pid, _ in result.chosen]) if model is not None else None,
            class_names=result.class_names,
        )
        result.metrics["selected"] = {"n": len(result.chosen), "arms": dict(Counter(arm for _, arm in result.chosen))}
        locked.state = State.SUCCEEDED
        locked.stage = State.SUCCEEDED
        locked.progress = 100.0
        locked.n_labels = result.n_labels
        locked.metrics = result.metrics
        locked.timings = {**reporter.timings}
        locked.finished_at = timezone.now()
        locked.save()
        pid = project.pk
        transaction.on_commit(lambda: broadcast(pid, round_payload(locked, "round.finished")))
        transaction.on_commit(lambda: broadcast(pid, {"type": "queue.refresh", "round": locked.pk}))
        for hook in run.on_publish:
            hook()
    run.weights_file = None  # committed: the file is the ModelVersion's now
    # The publish stage's own time (its writes included) is known only once they are committed.
    reporter.finish_timing()
    TrainingRound.objects.filter(pk=round_.pk).update(timings=reporter.timings)
    round_.refresh_from_db()
