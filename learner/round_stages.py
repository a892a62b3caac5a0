"""The stages of a training round, each a function of plain data: snapshot → embed → split → train → evaluate
→ score → select.

Each stage takes what earlier stages returned (a Pool of arrays, the pool's embeddings as ``Rows``, probability
arrays, a LabelSplit, a Classifier) and the round's RoundSetup (the project's choices, the settings, the
progress and cancel callbacks), and returns arrays, a Classifier or a metrics dict. ``snapshot`` streams the
pool from the database (it recomputes consensus and reads the labels); Patch rows are loaded afterwards only
where pixels are read, a chunk at a time. Nothing here writes what the round produces. ``learner.pipeline``
runs the stages in order and publishes their output in one transaction.

Memory stays bounded whatever the pool size: the pool is arrays (a few tens of bytes per patch), embeddings
are read from the per-slide store chunk by chunk, self-training pseudo-labels at most MAX_PSEUDO_LABELS
patches, and selections that read embeddings look at most at SELECT_SAMPLE candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from django.db import connection
from psycopg import sql

from annotations import consensus, reliability
from annotations.models import AnnotationTask, Consensus, LabelClass, Patch, Project, Slide
from learner.core.backbone import Backbone
from learner.core.classifier import Classifier
from learner.core.config import TrainConfig
from learner.core.data import LazyImages
from learner.core.embedding_store import Rows
from learner.core.errors import ProgressFn, StopFn, check_stop, report
from learner.core.evaluation import evaluate
from learner.core.strategies import cold_start, select_batch
from learner.core.training import class_sample, finetune, self_train_head, train_head

from .conf import LearnerSettings
from .embedding import PIXEL_CHUNK, image_size, load_patches, patch_images
from .shards import embed_pool_sharded

FINAL_LABEL_STATUSES = (Consensus.Status.AGREED, Consensus.Status.EXPERT)
# An expert gold set at least this large (in two classes or more) becomes the validation set and is kept
# out of training: it is a fixed yardstick across rounds, where a split of the labels would shift with them.
MIN_GOLD_FOR_VALIDATION = 30
# On a single slide the split unit is a square of this many patches a side, so neighbours stay together.
SPATIAL_BLOCK = 4
# Cold start, "diverse" and "kcenter" select among at most this many unlabelled patches (a seeded uniform
# sample above it): 50,000 × 1,904 float32 is 380 MB. Projects below it (every test, LC25000) see no change.
SELECT_SAMPLE = 50_000
# Self-training scans at most this many times MAX_PSEUDO_LABELS unlabelled patches for confident ones.
PSEUDO_LABEL_SCAN_FACTOR = 5
# Strategies that read the candidates' embeddings, not only their probabilities.
EMBEDDING_STRATEGIES = ("diverse", "kcenter")


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
            labels=project.training_labels,
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

    def for_backbone(self, backbone: Backbone, patch_size: int) -> RoundSetup:
        """This setup with the input side the backbone takes (a transformer's own, e.g. 224 for 64 px patches)."""
        return replace(self, config=replace(self.config, image_size=image_size(patch_size, backbone)))


@dataclass
class Pool:
    """Every patch of the project's ready slides, in id order, as arrays (never model instances): what the
    round knows of each patch and where it lies, for a pool of any size."""

    patch_ids: np.ndarray  # int64, ascending
    slide_ids: np.ndarray  # int64
    xs: np.ndarray  # int64, level-0 position on the slide
    ys: np.ndarray
    sizes: np.ndarray  # int64, level-0 edge
    is_gold: np.ndarray  # bool
    labels: dict[int, int]  # patch id -> class index (final consensus only)
    slide_groups: dict[int, str]  # slide id -> its group ("" when none)
    patch_size: int  # the project's: the side patches are read at
    split_unit: str = field(init=False)  # what a split holds out whole: "group", "slide" or "spatial block"
    arms: dict[int, str] = field(default_factory=dict)  # labelled patch id -> arm that chose it
    # (pool, classes) float32: each labelled patch's consensus posterior in class order, zeros elsewhere;
    # None when the snapshot has none (soft and weighted training then fall back to one-hot labels).
    posterior: np.ndarray | None = None
    y: np.ndarray = field(init=False)  # class index per pool patch, -1 where unlabelled
    labelled: np.ndarray = field(init=False)  # pool indices with a label
    unlabelled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.y = np.full(len(self.patch_ids), -1, dtype=np.int64)
        if self.labels:
            ids = np.fromiter(self.labels, dtype=np.int64, count=len(self.labels))
            at = np.searchsorted(self.patch_ids, ids)
            inside = (at < len(self.patch_ids)) & (self.patch_ids[np.minimum(at, len(self.patch_ids) - 1)] == ids)
            self.y[at[inside]] = np.array([self.labels[int(i)] for i in ids[inside]], dtype=np.int64)
        self.labelled = np.flatnonzero(self.y >= 0).astype(np.int64)
        self.unlabelled = np.flatnonzero(self.y < 0).astype(np.int64)
        self.split_unit = _split_unit(np.unique(self.slide_ids), self.slide_groups)

    def posteriors(self, idx: np.ndarray, k: int) -> np.ndarray:
        """The consensus posterior of labelled pool patches ``idx``, (len(idx), k): one-hot labels where
        the snapshot has no posterior or a row of it has no mass (soft training never fails on a row)."""
        out = np.zeros((len(idx), k), dtype=np.float32)
        if self.posterior is not None:
            out[:] = self.posterior[idx]
        empty = out.sum(1) <= 0
        out[np.flatnonzero(empty), self.y[idx][empty]] = 1.0
        return out

    def __len__(self) -> int:
        return len(self.patch_ids)

    def units(self, idx: np.ndarray) -> np.ndarray:
        """The split unit of each pool patch ``idx``: its slide group, else its slide, else a spatial block
        of SPATIAL_BLOCK patches a side (a single slide), so neighbours stay together."""
        slides = self.slide_ids[idx]
        if self.split_unit == "group":
            return np.array([self.slide_groups[int(s)] for s in slides])
        if self.split_unit == "slide":
            return np.array([f"slide-{s}" for s in slides])
        span = self.sizes[idx] * SPATIAL_BLOCK
        bx, by = self.xs[idx] // span, self.ys[idx] // span
        return np.array([f"block-{a}-{b}" for a, b in zip(bx.tolist(), by.tolist(), strict=True)])


@dataclass(frozen=True)
class LabelSplit:
    """Which labelled pool patches (pool indices) a round trains on and which it validates on."""

    train: np.ndarray
    val: np.ndarray
    unit: str  # what was held out whole: "gold", "group", "slide" or "spatial block"
    gold: bool  # the validation set is the expert gold set, never trained on


# --- snapshot ------------------------------------------------------------------------------------------------------


def _split_unit(slides: np.ndarray, slide_groups: dict[int, str]) -> str:
    """Split by slide group, else by slide; a single slide is split into spatial blocks of patches."""
    groups = [slide_groups.get(int(s), "") for s in slides]
    if len({g for g in groups if g}) >= 2 and all(groups):
        return "group"
    if len(slides) >= 2:
        return "slide"
    return "spatial block"


# The pool's columns, in the order of _pool_rows' array.
POOL_COLUMNS = ("id", "slide_id", "x", "y", "size", "is_gold")
_COPY_HEADER = 19  # signature (11 bytes), flags (4), header extension length (4, zero)


def _copy_row(columns: Sequence[str], kind: str) -> np.dtype:
    """One row of ``COPY ... (FORMAT binary)`` whose every column is 8 bytes (``kind`` "i" for bigint, "f"
    for double precision): a field count, then each field's length and its big-endian value. Fixed width,
    so the whole answer is one numpy array."""
    return np.dtype([("n", ">i2")] + [f for c in columns for f in ((f"{c}_len", ">i4"), (c, f">{kind}8"))])


def _copy_fixed(query: str | sql.Composed, columns: Sequence[str], kind: str, what: str) -> np.ndarray:
    """Run ``COPY (query) TO STDOUT (FORMAT binary)`` of ``columns`` (all 8-byte, none NULL) into an
    (rows, columns) array of int64 (``kind`` "i") or float64 ("f")."""
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(
        sql.SQL(query) if isinstance(query, str) else query
    )
    buffer = bytearray()
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        for block in copy:
            buffer += block
    body = memoryview(buffer)[_COPY_HEADER : len(buffer) - 2]  # the trailer is a field count of -1
    rows = np.frombuffer(body, dtype=_copy_row(columns, kind))
    if len(rows) and ((rows["n"] != len(columns)).any() or any((rows[f"{c}_len"] != 8).any() for c in columns)):
        raise ValueError(f"Unexpected COPY row layout while reading {what}.")  # a NULL or a type change
    out = np.empty((len(rows), len(columns)), dtype=np.int64 if kind == "i" else np.float64)
    for j, c in enumerate(columns):
        out[:, j] = rows[c]
    return out


def _pool_rows(project: Project) -> np.ndarray:
    """(id, slide, x, y, size, is_gold) of every patch of the project's ready slides, by id, as an int64 array.

    Read with one ``COPY ... TO STDOUT (FORMAT binary)``: at a million patches that is 74 MB parsed by numpy
    in one go, where fetching rows builds six Python objects per patch."""
    patch, slide = Patch._meta.db_table, Slide._meta.db_table
    columns = ", ".join(f"p.{c}::bigint" if c != "is_gold" else "p.is_gold::int::bigint" for c in POOL_COLUMNS)
    query = (
        f"SELECT {columns} FROM {patch} p JOIN {slide} s ON s.id = p.slide_id "
        f"WHERE p.project_id = {int(project.pk)} AND s.status = 'ready' ORDER BY p.id"
    )
    return _copy_fixed(query, POOL_COLUMNS, "i", "the pool")


def _final_labels(project: Project, class_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patch ids, class indices, posteriors) of every final consensus label, by patch id: int64, int64 and
    (labels, classes) float32 with the posterior's probability of each class in ``class_names`` order.

    One binary COPY of fixed-width float rows (the JSON posterior unpacked into one column per class by
    PostgreSQL), where reading the rows would build a dict per label."""
    names = [f"p{j}" for j in range(len(class_names))]
    probability = [
        sql.SQL("coalesce((c.posterior ->> {})::double precision, 0)").format(sql.Literal(name)) for name in class_names
    ]
    query = sql.SQL(
        "SELECT c.patch_id::double precision, (array_position({names}::text[], l.name) - 1)::double precision, {ps} "
        "FROM {consensus} c JOIN {label} l ON l.id = c.label_id "
        "WHERE c.project_id = {project} AND c.status IN ({statuses}) ORDER BY c.patch_id"
    ).format(
        names=sql.Literal(list(class_names)),
        ps=sql.SQL(", ").join(probability),
        consensus=sql.Identifier(Consensus._meta.db_table),
        label=sql.Identifier(LabelClass._meta.db_table),
        project=sql.Literal(int(project.pk)),
        statuses=sql.SQL(", ").join(sql.Literal(str(s)) for s in FINAL_LABEL_STATUSES),
    )
    # Every column as double precision: ids below 2**53 are exact, and one dtype keeps the rows fixed-width.
    rows = _copy_fixed(query, ["patch", "label", *names], "f", "the consensus labels")
    return rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2:].astype(np.float32)


def _aligned(patch_ids: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (one row per id of ``ids``) placed at the rows of ``patch_ids`` (both ascending); zeros
    for pool patches without one, and ids outside the pool dropped."""
    out = np.zeros((len(patch_ids), values.shape[1]), dtype=values.dtype)
    if len(patch_ids) and len(ids):
        at = np.minimum(np.searchsorted(patch_ids, ids), len(patch_ids) - 1)
        inside = patch_ids[at] == ids
        out[at[inside]] = values[inside]
    return out


def snapshot(project: Project, class_names: list[str]) -> Pool:
    """Recompute consensus (iterative methods run here) and take the labels as they are now.

    Votes cast after this point are used by the next round. A project that reads its crowd's reliabilities
    online (routing by value, or adaptive redundancy with the model prior: annotations.reliability.kept_current)
    also refits them here, so the batch is routed, and the next votes weighed, with every vote counted even when
    no worker has run the votes' own refresh (the worker's is debounced; this one is warm-started).
    """
    consensus.recompute_project_consensus(project)
    if reliability.kept_current(project):
        reliability.refresh(project)
    rows = _pool_rows(project)
    label_ids, label_index, label_posterior = _final_labels(project, class_names)
    labels = dict(zip(label_ids.tolist(), label_index.tolist(), strict=True))
    final = Consensus.objects.filter(project=project, status__in=FINAL_LABEL_STATUSES, label__isnull=False)
    # The arm of each labelled patch's latest crowd task (what the live control compares); none for the rest.
    latest = (
        AnnotationTask.objects.filter(
            project=project, kind=AnnotationTask.Kind.CROWD, patch_id__in=final.values("patch_id")
        )
        .order_by("patch_id", "-id")
        .distinct("patch_id")
        .values_list("patch_id", "arm")
    )
    slide_groups = dict(Slide.objects.filter(project=project, status="ready").values_list("pk", "group"))
    return Pool(
        patch_ids=rows[:, 0].copy(),
        slide_ids=rows[:, 1].copy(),
        xs=rows[:, 2].copy(),
        ys=rows[:, 3].copy(),
        sizes=rows[:, 4].copy(),
        is_gold=rows[:, 5].astype(bool),
        labels=labels,
        slide_groups=slide_groups,
        patch_size=project.patch_size,
        arms={pid: arm for pid, arm in latest if arm},
        posterior=_aligned(rows[:, 0], label_ids, label_posterior),
    )


# --- embed ---------------------------------------------------------------------------------------------------------


def embed_pool(
    pool: Pool,
    backbone: Backbone,
    backbone_name: str,
    setup: RoundSetup,
    stats: dict[str, Any] | None = None,
    backbone_weights: str = "",
) -> Rows:
    """The pool's embeddings, what the store lacks spread as shards over every worker on the shard queue
    (``learner.shards``); ``stats`` gets the pass's counts."""
    return embed_pool_sharded(
        pool.patch_size, pool.patch_ids, pool.slide_ids, pool.xs, pool.ys, pool.sizes, backbone, backbone_name,
        setup.settings, progress=setup.progress, should_stop=setup.should_stop, stats=stats,
        backbone_weights=backbone_weights,
    )  # fmt: skip


# --- split ---------------------------------------------------------------------------------------------------------


def gold_validation(pool: Pool) -> np.ndarray:
    """The labelled gold patches (pool indices) when there are enough to validate on, else none."""
    gold = pool.labelled[pool.is_gold[pool.labelled]]
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
    labelled: np.ndarray, units: Sequence[str] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole units (never single patches) until about ``fraction`` of the labels are held out.

    ``labelled`` are pool indices and ``units[j]`` the split unit of ``labelled[j]``. Returns (train
    indices, validation indices).
    """
    rng = np.random.default_rng(seed)
    unit_of = np.asarray(units)
    units_ = np.unique(unit_of)
    rng.shuffle(units_)
    target = max(1, round(fraction * len(labelled)))
    held: list[str] = []
    count = 0
    for unit in units_:
        if count >= target or len(held) == len(units_) - 1:
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
    train, val = split_by_group(pool.labelled, pool.units(pool.labelled), fraction, seed)
    if len(val) == 0 or len(np.unique(pool.y[train])) < 2:
        train, val = pool.labelled, np.array([], dtype=np.int64)
    return LabelSplit(train=train, val=val, unit=pool.split_unit, gold=False)


# --- train ---------------------------------------------------------------------------------------------------------


def platform_head(
    x: np.ndarray,
    y: np.ndarray,
    unlabelled: np.ndarray | Rows,
    class_names: list[str],
    backbone: Backbone,
    config: TrainConfig,
    settings: LearnerSettings,
    *,
    posterior: np.ndarray | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Classifier:
    """The head-mode model a round deploys: self-trained on the unlabelled embeddings (at most
    LEARNER MAX_PSEUDO_LABELS of them) when LEARNER SELF_TRAINING is on, else the plain head on the labels.
    ``posterior`` (the labels' consensus posteriors) is what soft or weighted training (config.labels) uses."""
    if settings.SELF_TRAINING:
        return self_train_head(
            x, y, unlabelled, class_names, backbone, config, posterior=posterior,
            threshold=settings.SELF_TRAINING_THRESHOLD, max_pseudo_labels=settings.MAX_PSEUDO_LABELS, tta=settings.TTA,
            progress=progress, should_stop=should_stop,
        )  # fmt: skip
    return train_head(
        x, y, class_names, backbone, config, posterior=posterior, tta=settings.TTA, progress=progress,
        should_stop=should_stop,
    )  # fmt: skip


def pseudo_label_candidates(pool: Pool, setup: RoundSetup) -> np.ndarray:
    """The unlabelled patches self-training looks at for confident ones: all of them up to
    PSEUDO_LABEL_SCAN_FACTOR × MAX_PSEUDO_LABELS (100,000 by default), else a seeded uniform sample of that
    many, in pool order, so a head's pass over them costs the same at any pool size. Pools below the
    limit (every test, LC25000) see no change."""
    limit = PSEUDO_LABEL_SCAN_FACTOR * setup.settings.MAX_PSEUDO_LABELS
    if len(pool.unlabelled) <= limit:
        return pool.unlabelled
    return np.sort(np.random.default_rng([setup.config.seed, limit]).choice(pool.unlabelled, limit, replace=False))


def head_labels(pool: Pool, idx: np.ndarray, setup: RoundSetup) -> np.ndarray:
    """The labelled patches ``idx`` a head fits on: all of them up to LEARNER HEAD_MAX_LABELS, else a seeded
    sample of that many drawn class by class (learner.core.training.class_sample), so the fit's memory and
    time stay bounded however many patches are labelled."""
    limit = setup.settings.HEAD_MAX_LABELS
    if len(idx) <= limit:
        return idx
    balanced = setup.config.balance != "none"
    return idx[class_sample(pool.y[idx], limit, balanced=balanced, seed=setup.config.seed)]


def _fit_head(
    pool: Pool, emb: Rows, idx: np.ndarray, backbone: Backbone, setup: RoundSetup, *, progress: bool
) -> Classifier:
    idx = head_labels(pool, idx, setup)
    return platform_head(
        emb.subset(idx), pool.y[idx], emb.subset(pseudo_label_candidates(pool, setup)), setup.class_names, backbone,
        setup.config, setup.settings, posterior=label_posteriors(pool, idx, setup),
        progress=setup.progress if progress else None, should_stop=setup.should_stop,
    )  # fmt: skip


def label_posteriors(pool: Pool, idx: np.ndarray, setup: RoundSetup) -> np.ndarray | None:
    """The consensus posteriors of labelled pool patches ``idx`` when the project trains on them (soft or
    weighted labels), else None."""
    return pool.posteriors(idx, len(setup.class_names)) if setup.config.labels != "hard" else None


def pool_images(pool: Pool, idx: np.ndarray) -> LazyImages:
    """The pixels of pool patches ``idx`` (their Patch rows loaded now: keep ``idx`` to a chunk or a label set)."""
    return patch_images(load_patches(pool.patch_ids[idx]))


def train(pool: Pool, emb: Rows, split: LabelSplit, backbone: Backbone, setup: RoundSetup) -> Classifier:
    """A head on the embeddings, or the whole network fine-tuned on the pixels (project.train_mode)."""
    if setup.train_mode != "finetune":
        return _fit_head(pool, emb, split.train, backbone, setup, progress=True)
    has_val = len(split.val) > 0
    result = finetune(
        backbone.spec,
        pool_images(pool, split.train),
        pool.y[split.train],
        setup.class_names,
        setup.config,
        val_images=pool_images(pool, split.val) if has_val else None,
        val_labels=pool.y[split.val] if has_val else None,
        posterior=label_posteriors(pool, split.train, setup),
        progress=setup.progress,
        should_stop=setup.should_stop,
    )
    return result.classifier


def refit_for_deployment(
    pool: Pool, emb: Rows, split: LabelSplit, backbone: Backbone, setup: RoundSetup
) -> Classifier | None:
    """In head mode with labels held out: a head refitted on every label (seconds), which the round deploys,
    while the held-out metrics stand as its estimate. None when the trained model is the one to deploy
    (fine-tuning; no hold-out; gold validation, whose patches are never trained on)."""
    if setup.train_mode != "head" or not len(split.val) or split.gold:
        return None
    return _fit_head(pool, emb, pool.labelled, backbone, setup, progress=False)


# --- evaluate, score -----------------------------------------------------------------------------------------------


def predict(clf: Classifier, pool: Pool, emb: Rows, idx: np.ndarray, setup: RoundSetup) -> np.ndarray:
    """Probabilities (float32) for the pool patches ``idx``: from the embeddings for a head, chunk by chunk;
    from the pixels otherwise, a chunk of Patch rows at a time."""
    proba = np.empty((len(idx), len(setup.class_names)), dtype=np.float32)
    if clf.mode == "head":
        for positions, rows in emb.chunks(idx):
            check_stop(setup.should_stop, "score")
            proba[positions] = clf.predict_proba(rows)
        return proba
    for start in range(0, len(idx), PIXEL_CHUNK):
        part = idx[start : start + PIXEL_CHUNK]
        proba[start : start + len(part)] = clf.predict_proba(
            pool_images(pool, part), device=setup.settings.DEVICE, should_stop=setup.should_stop
        )
        report(setup.progress, "score", (start + len(part)) / len(idx))
    return proba


def arm_metrics(pool: Pool, emb: Rows, split: LabelSplit, backbone: Backbone, setup: RoundSetup) -> dict[str, Any]:
    """The live control: a head trained only on the random arm's labels vs one on as many strategy labels."""
    train_idx, val, y = split.train, split.val, pool.y
    arm_of = np.array([pool.arms.get(int(pool.patch_ids[i]), "") for i in train_idx])
    random_idx = train_idx[arm_of == "random"]
    strategy_idx = train_idx[(arm_of != "random") & (arm_of != "")]
    n = min(len(random_idx), len(strategy_idx))
    if n < 4 or len(val) == 0:
        return {}
    n = min(n, setup.settings.HEAD_MAX_LABELS)  # as many labels as a head fits on at most, for both arms
    rng = np.random.default_rng(setup.config.seed)
    strategy_idx = rng.choice(strategy_idx, size=n, replace=False)
    random_idx = rng.choice(random_idx, size=n, replace=False)
    out: dict[str, Any] = {}
    for arm, idx in (("strategy", strategy_idx), ("random", random_idx)):
        if len(np.unique(y[idx])) < 2:
            continue
        clf = train_head(
            emb.subset(idx), y[idx], setup.class_names, backbone, setup.config,
            posterior=label_posteriors(pool, idx, setup),
        )  # fmt: skip
        m = evaluate(y[val], predict(clf, pool, emb, val, setup), setup.class_names)
        out[arm] = {
            "n_labels": int(n),
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "roc_auc": m.get("roc_auc"),
            "strategy": setup.strategy if arm == "strategy" else "random",
        }
    return out


def evaluate_model(
    clf: Classifier, pool: Pool, emb: Rows, split: LabelSplit, backbone: Backbone, setup: RoundSetup
) -> dict[str, Any]:
    """The round's metrics: sizes and split, and the held-out scores when labels were held out."""
    metrics: dict[str, Any] = {
        "n_labels": len(pool.labelled),
        "n_train": len(split.train),
        # the labels the model was fitted on: n_train, or a sample of LEARNER HEAD_MAX_LABELS of them
        "n_fit": int(clf.extra.get("n_train", len(split.train))),
        "n_val": len(split.val),
        "split": split.unit,
        "train_mode": setup.train_mode,
        "training_labels": setup.config.labels,
    }
    if not len(split.val):
        metrics["note"] = "Too few groups to hold any out; no validation metrics this round."
        return metrics
    metrics.update(evaluate(pool.y[split.val], predict(clf, pool, emb, split.val, setup), setup.class_names))
    if setup.train_mode == "head":
        metrics["arms"] = arm_metrics(pool, emb, split, backbone, setup)
    return metrics


def score(clf: Classifier, pool: Pool, emb: Rows, setup: RoundSetup) -> np.ndarray:
    """The model's probabilities for every pool patch, (pool, classes) float32."""
    return predict(clf, pool, emb, np.arange(len(pool), dtype=np.int64), setup)


# --- select --------------------------------------------------------------------------------------------------------


def _candidates(unlabelled: np.ndarray, seed: int) -> np.ndarray:
    """The unlabelled patches a clustering or distance-based selection looks at: all of them up to
    SELECT_SAMPLE, else a seeded uniform sample of that many (in pool order), so its memory and time stay
    bounded (SELECT_SAMPLE rows of embeddings); a uniform sample keeps the random arm unbiased."""
    if len(unlabelled) <= SELECT_SAMPLE:
        return unlabelled
    return np.sort(np.random.default_rng([seed, SELECT_SAMPLE]).choice(unlabelled, SELECT_SAMPLE, replace=False))


def select(pool: Pool, emb: Rows, proba: np.ndarray | None, setup: RoundSetup) -> list[tuple[int, str]]:
    """The next batch as (patch id, arm), best first: by the project's strategy over the model's
    probabilities, or, with no model yet (``proba=None``, a cold start), spread over the embedding space.
    Uncertainty strategies rank the whole unlabelled pool from its probabilities alone; cold start,
    "diverse" and "kcenter" read embeddings, of at most SELECT_SAMPLE candidates."""
    unlabelled = pool.unlabelled
    if not len(unlabelled):
        return []
    n = min(setup.batch_size, len(unlabelled))
    seed = setup.config.seed
    if proba is None:
        candidates = _candidates(unlabelled, seed)
        picks = cold_start(
            emb.take(candidates), n, random_fraction=setup.random_fraction, rng=seed, should_stop=setup.should_stop
        )
    else:
        needs_embeddings = setup.strategy in EMBEDDING_STRATEGIES
        candidates = _candidates(unlabelled, seed) if needs_embeddings else unlabelled
        centres = _candidates(pool.labelled, seed) if setup.strategy == "kcenter" else None
        picks = select_batch(
            setup.strategy,
            n,
            proba=proba[candidates],
            embeddings=emb.take(candidates) if needs_embeddings else None,
            labelled_embeddings=emb.take(centres) if centres is not None else None,
            random_fraction=setup.random_fraction,
            rng=seed,
            should_stop=setup.should_stop,
        )
    return [(int(pool.patch_ids[candidates[s.index]]), s.arm) for s in picks]
