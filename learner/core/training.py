"""Training: a softmax-regression head on cached embeddings ("head") and staged fine-tuning ("finetune")."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn

from learner.core.backbone import Backbone, create_model
from learner.core.classifier import Classifier, LinearHead
from learner.core.config import BackboneSpec, TrainConfig
from learner.core.data import (
    ImageSource,
    Reader,
    StainNormaliser,
    as_source,
    augment,
    normalise,
    read_batches,
)
from learner.core.embedding_store import Rows, as_rows
from learner.core.embeddings import forward_batches, prepare_model, resolve_device, to_device
from learner.core.errors import LearnerError, ProgressFn, StopFn, check_stop, report
from learner.core.evaluation import evaluate


def _check_labels(labels: Sequence[int] | np.ndarray, n_items: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels, dtype=int)
    if len(y) != n_items:
        raise LearnerError(f"Got {len(y)} labels for {n_items} items; give one label per item.")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise LearnerError(f"Labels must be class indices 0..{n_classes - 1}.")
    if len(np.unique(y)) < 2:
        raise LearnerError("Training needs labelled examples of at least two classes; label some more patches.")
    return y


def check_posterior(posterior: np.ndarray | None, n_items: int, n_classes: int) -> np.ndarray:
    """The consensus posterior of each item as (items, classes) float64 rows summing to 1."""
    if posterior is None:
        raise LearnerError("Soft or weighted labels need each label's consensus posterior; none was given.")
    p = np.asarray(posterior, dtype=np.float64)
    if p.shape != (n_items, n_classes):
        raise LearnerError(f"Got posteriors of shape {p.shape} for {n_items} items of {n_classes} classes.")
    if not np.isfinite(p).all() or (p < 0).any() or (p.sum(1) <= 0).any():
        raise LearnerError("Posteriors must be non-negative probabilities with some mass on a class.")
    return p / p.sum(1, keepdims=True)


def label_weights(y: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """ "weighted" labels: each label weighs the posterior's probability of it, scaled to mean 1, so that
    only the weights' ratios change a fit, not the overall strength of its L2 penalty or learning rate."""
    w = posterior[np.arange(len(y)), y]
    if w.sum() <= 0:
        raise LearnerError("The posteriors give the labels no probability; nothing to train on.")
    return w / w.mean()


# "soft" labels in head mode: an item's posterior becomes one row per class it gives at least this much
# (the rest renormalised), weighted by its probability. A weighted log-loss over those rows is exactly the
# cross-entropy against the posterior, with the same solver as hard labels; consensus posteriors are mostly
# near one-hot, so only the items the crowd split on add rows.
SOFT_TARGET_MIN = 1e-3


def soft_rows(posterior: np.ndarray, min_p: float = SOFT_TARGET_MIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item index, class, weight) per class that an item's posterior gives at least ``min_p``."""
    p = np.where(posterior >= min_p, posterior, 0.0)
    p /= p.sum(1, keepdims=True)  # the largest entry is >= 1/k >= min_p, so every row keeps some mass
    items, classes = np.nonzero(p)
    return items, classes, p[items, classes]


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' weights n / (k * count_c); classes without examples get weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def class_sample(y: np.ndarray, limit: int, *, balanced: bool, seed: int) -> np.ndarray:
    """Positions of ``limit`` of the labels ``y`` (all of them when there are no more), drawn class by class
    with a seeded generator and returned sorted. ``balanced`` (a fit that weighs classes equally): every
    class keeps all its labels up to one quota, the largest that fills ``limit``, so a rare class loses
    none; otherwise each class keeps its share of ``y``, so the fit sees the same class mix."""
    y = np.asarray(y)
    if len(y) <= limit:
        return np.arange(len(y), dtype=np.int64)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    keep = _quotas(counts, limit) if balanced else _shares(counts, limit)
    rng = np.random.default_rng([seed, limit])
    picks = [rng.choice(np.flatnonzero(inverse == c), int(keep[c]), replace=False) for c in range(len(classes))]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _quotas(counts: np.ndarray, limit: int) -> np.ndarray:
    """Per class min(count, q), q the largest quota whose total is at most ``limit``, and the labels left
    over one each to the classes still above it, in class order: ``limit`` in all."""
    q = 0
    for c in np.sort(counts):  # raise the quota to each class's count while the total still fits
        if np.minimum(counts, c).sum() > limit:
            break
        q = int(c)
    rest = len(counts) - int((counts <= q).sum())  # the classes above the quota share what is left evenly
    q += (limit - int(np.minimum(counts, q).sum())) // max(rest, 1)
    keep = np.minimum(counts, q)
    keep[np.flatnonzero(counts > keep)[: limit - int(keep.sum())]] += 1
    return keep


def _shares(counts: np.ndarray, limit: int) -> np.ndarray:
    """Per class its share of ``limit`` by count (largest remainders rounded up), and at least one label, so
    that no class drops out of the fit: ``limit`` in all (the largest class gives up what the floor took)."""
    exact = counts * limit / counts.sum()
    keep = np.maximum(np.floor(exact).astype(np.int64), 1)
    keep[np.argsort(-(exact - keep), kind="stable")[: max(limit - int(keep.sum()), 0)]] += 1
    keep[np.argmax(counts)] -= int(keep.sum()) - limit
    return keep


# --- head mode -----------------------------------------------------------------------------------------------------


def train_head(
    embeddings: np.ndarray | Rows,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    backbone: Backbone,
    config: TrainConfig | None = None,
    *,
    posterior: np.ndarray | None = None,
    image_size: int | None = None,
    tta: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    extra_rows: np.ndarray | None = None,
) -> Classifier:
    """Multinomial logistic regression on standardised embeddings, returned as a torch LinearHead.

    Log-loss training gives probabilities that are reasonably calibrated out of the box (see `ece` in the
    evaluation dict). Classes with no labels yet get probability ~0. `image_size`/`tta` must describe how
    the embeddings were made, so that images given later to predict_proba are embedded the same way.
    With `config.labels` "soft" or "weighted", `posterior` (items, classes) is each label's consensus
    posterior: the fit is the cross-entropy against it, or the labels' log-loss weighted by it.
    `embeddings` may be an array or `Rows` (read chunk by chunk); `extra_rows`, when given, are more rows
    after them (self-training's pseudo-labelled ones), `labels` covering both.
    """
    config = config or TrainConfig()
    k = len(class_names)
    parts = [as_rows(embeddings)] + ([as_rows(extra_rows)] if extra_rows is not None else [])
    y = _check_labels(labels, sum(len(part) for part in parts), k)
    p = check_posterior(posterior, len(y), k) if config.labels != "hard" else None
    check_stop(should_stop, "train")
    report(progress, "train", 0.0)
    z, mean, scale = standardised(parts)
    clf = _fit_logistic(z, y, p, config, k)
    del z
    check_stop(should_stop, "train")

    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    dim = parts[0].dim
    weight = np.zeros((k, dim), dtype=np.float32)
    bias = np.full(k, -30.0, dtype=np.float32)  # unseen classes: exp(-30) ~ 1e-13
    for row, cls in enumerate(clf.classes_):
        weight[cls], bias[cls] = coef[row], intercept[row]
    head = LinearHead(dim, k)
    with torch.no_grad():
        head.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        head.scale.copy_(torch.from_numpy(scale.astype(np.float32)))
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    head.eval()
    report(progress, "train", 1.0)
    return Classifier(
        mode="head",
        class_names=list(class_names),
        spec=backbone.spec,
        normalisation=backbone.normalisation,
        image_size=image_size or config.image_size,
        network=head,
        weights_id=backbone.weights_id,
        tta=tta,
        _backbone=backbone,
        extra={"n_train": len(y), "labels": config.labels},
    )


def standardised(parts: Sequence[Rows]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's design matrix: the rows of ``parts``, in order, standardised (zero mean, unit variance per
    feature, as StandardScaler does), with the mean and scale. lbfgs fits in float64, so the matrix is
    built as one float64 array, filled chunk by chunk and standardised in place: the only copy of the rows
    the fit holds (8 bytes a value, where StandardScaler's float32 copy and LogisticRegression's float64
    one of it held 12 beside the caller's float32 rows). The statistics are computed from the filled array,
    so they are the same whether the rows come from memory or from slide files."""
    n, dim = sum(len(part) for part in parts), parts[0].dim
    z = np.empty((n, dim), dtype=np.float64)
    offset = 0
    for part in parts:
        for positions, rows in part.chunks():
            z[offset + positions] = rows
        offset += len(part)
    mean = z.mean(axis=0)
    z -= mean
    scale = np.sqrt(np.einsum("ij,ij->j", z, z) / max(n, 1))  # the variance with no (n, dim) temporary
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # a constant feature is left as it is, as sklearn does
    z /= scale
    return z, mean, scale


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, posterior: np.ndarray | None, config: TrainConfig, k: int
) -> LogisticRegression:
    """The head's fit on standardised ``x``: on the labels, or (``posterior`` given) on the posterior as soft
    targets (one weighted row per likely class) or as the labels' weights, as ``config.labels`` says."""
    balanced = config.balance != "none"
    clf = LogisticRegression(
        C=config.head_c,
        max_iter=config.head_max_iter,
        class_weight="balanced" if balanced and config.labels != "soft" else None,
        random_state=config.seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if posterior is None:
            clf.fit(x, y)
        elif config.labels == "weighted":
            clf.fit(x, y, sample_weight=label_weights(y, posterior))
        else:
            items, classes, w = soft_rows(posterior)
            if balanced:  # "balanced" over each class's probability mass, as sklearn's is over its count
                mass = np.bincount(classes, weights=w, minlength=k)
                present = mass > 0
                per_class = np.zeros(k)
                per_class[present] = len(y) / (present.sum() * mass[present])
                w = w * per_class[classes]
            clf.fit(x[items], classes, sample_weight=w)
    return clf


# --- fine-tuning ---------------------------------------------------------------------------------------------------


def self_train_head(
    embeddings: np.ndarray | Rows,
    labels: Sequence[int] | np.ndarray,
    unlabelled: np.ndarray | Rows,
    class_names: Sequence[str],
    backbone: Backbone,
    config: TrainConfig | None = None,
    *,
    posterior: np.ndarray | None = None,
    threshold: float = 0.95,
    max_pseudo_labels: int | None = None,
    image_size: int | None = None,
    tta: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Classifier:
    """Self-training (one round of pseudo-labelling): fit the head on the labels, let it label the
    unlabelled embeddings it is sure of (max probability > `threshold`), and fit again on both.

    Uses the unlabelled pool the loop has anyway; no label beyond the given ones. `unlabelled` is an array
    or `Rows` read chunk by chunk (a pool of any size); with `max_pseudo_labels`, more confident items than
    that are sampled down to it (seeded by `config.seed`, kept in pool order), which bounds the second
    fit's size and memory whatever the pool. The returned head's `extra["pseudo_labels"]` says how many
    pool items joined. With soft or weighted labels (`posterior`, see train_head) the pseudo-labels are
    hard: one-hot posteriors, weight 1."""
    config = config or TrainConfig()
    head = train_head(
        embeddings, labels, class_names, backbone, config, posterior=posterior, image_size=image_size, tta=tta,
        should_stop=should_stop,
    )  # fmt: skip
    pool = as_rows(np.asarray(unlabelled, dtype=np.float32) if isinstance(unlabelled, np.ndarray) else unlabelled)
    if len(pool) == 0:
        head.extra["pseudo_labels"] = 0
        return head
    sure_parts, label_parts = [], []
    for positions, rows in pool.chunks():
        check_stop(should_stop, "train")
        proba = head.predict_proba(rows)
        sure = proba.max(1) > threshold
        sure_parts.append(positions[sure])
        label_parts.append(proba[sure].argmax(1))
    sure_idx, pseudo = np.concatenate(sure_parts), np.concatenate(label_parts)
    order = np.argsort(sure_idx, kind="stable")  # pool order, as one pass over an array gives
    sure_idx, pseudo = sure_idx[order], pseudo[order]
    if max_pseudo_labels is not None and len(sure_idx) > max_pseudo_labels:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(sure_idx), max_pseudo_labels, replace=False))
        sure_idx, pseudo = sure_idx[keep], pseudo[keep]
    y = np.concatenate([np.asarray(labels, dtype=np.int64), pseudo.astype(np.int64)])
    p = None
    if config.labels != "hard":
        p = np.concatenate(
            [check_posterior(posterior, len(y) - len(pseudo), len(class_names)), _one_hot(pseudo, len(class_names))]
        )
    final = train_head(
        embeddings, y, class_names, backbone, config, posterior=p, image_size=image_size, tta=tta,
        progress=progress, should_stop=should_stop, extra_rows=pool.take(sure_idx),
    )  # fmt: skip
    final.extra.update(n_train=len(y) - len(sure_idx), pseudo_labels=len(sure_idx))
    return final


def _one_hot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k))
    out[np.arange(len(y)), y] = 1.0
    return out


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps` (pure; multiply the base lr)."""
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EarlyStopping:
    """Keeps the best state seen (by score, higher is better) and says when patience ran out."""

    patience: int
    best_score: tuple[float, ...] | None = None
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0

    def step(self, epoch: int, score: tuple[float, ...], model: nn.Module) -> bool:
        """Record an epoch; returns True when training should stop."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs > self.patience


@dataclass
class FinetuneResult:
    classifier: Classifier
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    val_metrics: dict[str, Any] | None = None


def _epoch_order(y: np.ndarray, n_classes: int, balance: str, gen: np.random.Generator) -> np.ndarray:
    if balance == "sampler":  # class-balanced sampling with replacement, same epoch length
        w = class_weights(y, n_classes)[y]
        return gen.choice(len(y), size=len(y), replace=True, p=w / w.sum())
    return gen.permutation(len(y))


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    head = model.get_classifier()  # type: ignore[operator]
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head_params)


def _train_mode(model: nn.Module, frozen: bool) -> None:
    # a frozen body keeps its BatchNorm statistics: small label sets would otherwise wreck them
    model.train()
    if frozen:
        model.eval()
        model.get_classifier().train()  # type: ignore[operator]


@contextlib.contextmanager
def _autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if device.type == "cuda" and amp:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _loss(
    loss_fn: nn.CrossEntropyLoss,
    logits: torch.Tensor,
    target: torch.Tensor,
    idx: np.ndarray,
    soft: np.ndarray | None,
    sample_w: np.ndarray | None,
    class_w: torch.Tensor | None,
) -> torch.Tensor:
    """A batch's loss: on the labels; against the posteriors (``soft``, probability targets, whose mean torch
    takes over the batch); or with each label's loss weighted (``sample_w``), normalised as torch normalises
    a class-weighted mean (by the batch's class weights), so that weights of 1 give the hard loss."""
    if soft is not None:
        return loss_fn(logits, torch.as_tensor(soft[idx], dtype=torch.float32, device=logits.device))
    if sample_w is None:
        return loss_fn(logits, target)
    per_item = loss_fn(logits, target) * torch.as_tensor(sample_w[idx], dtype=torch.float32, device=logits.device)
    return per_item.sum() / class_w[target].sum() if class_w is not None else per_item.mean()


def finetune(
    spec: BackboneSpec,
    images: ImageSource | Sequence,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    config: TrainConfig | None = None,
    *,
    val_images: ImageSource | Sequence | None = None,
    val_labels: Sequence[int] | np.ndarray | None = None,
    posterior: np.ndarray | None = None,
    stain: StainNormaliser | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    reader: Reader | None = None,
) -> FinetuneResult:
    """Fine-tune `spec` on labelled images: `frozen_epochs` training only the new classifier, then the whole
    network (backbone lr scaled by `backbone_lr_scale`), AdamW + warm-up/cosine schedule, H&E augmentation,
    class-weighted loss or balanced sampling. With a validation set: early stopping on (balanced accuracy,
    -loss) and the best epoch's weights are returned; without one, the last epoch's.
    bf16 autocast and channels_last on CUDA; the same code in fp32 on CPU. With `config.labels` "soft" the
    loss is the cross-entropy against `posterior` (each training label's consensus posterior); "weighted"
    weighs each label's loss by the posterior's probability of it (see label_weights). Validation stays on
    the hard labels it is given.
    """
    config = config or TrainConfig(mode="finetune")
    k = len(class_names)
    train_src = as_source(images)
    y = _check_labels(labels, len(train_src), k)
    p = check_posterior(posterior, len(y), k) if config.labels != "hard" else None
    sample_w = label_weights(y, p) if p is not None and config.labels == "weighted" else None
    val_src = as_source(val_images) if val_images is not None else None
    y_val = np.asarray(val_labels, dtype=int) if val_labels is not None else None
    if (val_src is None) != (y_val is None) or (
        val_src is not None and y_val is not None and len(val_src) != len(y_val)
    ):
        raise LearnerError("Give validation images and labels together, one label per image.")

    torch.manual_seed(config.seed)
    gen = np.random.default_rng(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    built = create_model(spec, num_classes=k)
    model = prepare_model(built.model, device, config.channels_last)

    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    base_lrs = [config.lr * config.backbone_lr_scale, config.lr]
    optimiser = torch.optim.AdamW(
        [{"params": body, "lr": base_lrs[0]}, {"params": head, "lr": base_lrs[1]}], weight_decay=config.weight_decay
    )
    weight = torch.tensor(class_weights(y, k), dtype=torch.float32, device=device) if config.balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(
        weight=weight, label_smoothing=config.label_smoothing, reduction="none" if sample_w is not None else "mean"
    )

    steps_per_epoch = math.ceil(len(y) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total_steps)
    stopper = EarlyStopping(config.patience)
    reader = reader or Reader()
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(config.epochs):
        frozen = epoch < config.frozen_epochs
        _set_frozen(model, frozen)
        _train_mode(model, frozen)
        order = _epoch_order(y, k, config.balance, gen)
        running, seen = 0.0, 0
        chunks = [order[start : start + config.batch_size] for start in range(0, len(order), config.batch_size)]
        batches = read_batches(train_src, [c.tolist() for c in chunks], config.image_size, stain, reader)
        try:
            for idx in chunks:
                check_stop(should_stop, "train")
                x = next(batches)
                x = augment(x, config.augment, aug_gen) if config.augment else x
                x = to_device(normalise(x, built.normalisation), device, config.channels_last)
                target = torch.as_tensor(y[idx], device=device)
                factor = lr_factor(step, total_steps, warmup, config.min_lr_ratio)
                for group, base in zip(optimiser.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                with _autocast(device, config.amp):
                    logits = model(x).float()
                loss = _loss(loss_fn, logits, target, idx, p if config.labels == "soft" else None, sample_w, weight)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
                step += 1
                report(progress, "train", step / max(1, total_steps))
        finally:
            batches.close()  # type: ignore[attr-defined]  # a stopped pass stops its readers
        record: dict[str, Any] = {"epoch": epoch, "frozen": frozen, "train_loss": running / max(1, seen)}
        if val_src is not None and y_val is not None:
            model.eval()
            proba = forward_batches(
                lambda t: torch.softmax(model(t).float(), dim=1),
                val_src,
                range(len(val_src)),
                image_size=config.image_size,
                normalisation=built.normalisation,
                batch_size=config.batch_size,
                device=device,
                stain=stain,
                stage="validate",
                reader=reader,
                progress=progress,
                should_stop=should_stop,
            )
            val_loss = float(-np.log(np.clip(proba[np.arange(len(y_val)), y_val], 1e-12, None)).mean())
            metrics = evaluate(y_val, proba, class_names)
            record.update(
                val_loss=val_loss, val_accuracy=metrics["accuracy"], val_balanced_accuracy=metrics["balanced_accuracy"]
            )
            history.append(record)
            if stopper.step(epoch, (metrics["balanced_accuracy"], -val_loss), model):
                break
        else:
            history.append(record)
    check_stop(should_stop, "train")

    best_metrics = None
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
        best_metrics = {k: v for k, v in history[stopper.best_epoch].items() if k.startswith("val_")}
    model.eval()
    classifier = Classifier(
        mode="finetune",
        class_names=list(class_names),
        spec=spec,
        normalisation=built.normalisation,
        image_size=config.image_size,
        network=model,
        weights_id=built.weights_id,
        extra={
            "n_train": len(y),
            "best_epoch": stopper.best_epoch if stopper.best_state else len(history) - 1,
            "labels": config.labels,
        },
    )
    return FinetuneResult(classifier, history, stopper.best_epoch, best_metrics)
