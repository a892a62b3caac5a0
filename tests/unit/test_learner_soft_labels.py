"""Soft and weighted labels: training on the consensus posterior moves a model in the direction the posterior
says, in head mode (softmax regression on embeddings, with and without self-training) and in fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from learner.core.backbone import Backbone, Normalisation
from learner.core.config import AugmentConfig, BackboneSpec, TrainConfig
from learner.core.errors import LearnerError
from learner.core.training import (
    _loss,
    check_posterior,
    finetune,
    label_weights,
    self_train_head,
    soft_rows,
    train_head,
)

NAMES = ["a", "b"]


def toy_backbone() -> Backbone:
    return Backbone(nn.Identity(), BackboneSpec(), "toy", Normalisation((0.5,) * 3, (0.5,) * 3), 2)


def two_clusters(n: int = 20, seed: int = 0) -> np.ndarray:
    """``n`` items near (-2, 0), then ``n`` near (+2, 0)."""
    rng = np.random.default_rng(seed)
    centres = np.repeat([[-2.0, 0.0], [2.0, 0.0]], n, axis=0)
    return (centres + rng.normal(0, 0.05, centres.shape)).astype(np.float32)


def p_b(clf: object, x: np.ndarray) -> float:
    return float(clf.predict_proba(x)[:, 1].mean())  # type: ignore[attr-defined]


def test_soft_targets_fit_the_posterior_where_hard_labels_fit_certainty() -> None:
    x = two_clusters()
    y = np.repeat([0, 1], 20)
    # The crowd leaned to a on the left and to b on the right, 80:20 each time (equal mass per class, so
    # the class balancing leaves the targets as they are).
    posterior = np.repeat([[0.8, 0.2], [0.2, 0.8]], 20, axis=0)
    config = TrainConfig(head_c=100.0)
    hard = train_head(x, y, NAMES, toy_backbone(), config, posterior=posterior)  # config.labels is "hard"
    soft = train_head(x, y, NAMES, toy_backbone(), TrainConfig(head_c=100.0, labels="soft"), posterior=posterior)
    right, left = x[20:], x[:20]
    assert p_b(hard, right) > 0.97 and p_b(hard, left) < 0.03
    assert p_b(soft, right) == pytest.approx(0.8, abs=0.02)
    assert p_b(soft, left) == pytest.approx(0.2, abs=0.02)
    assert soft.extra["labels"] == "soft" and hard.extra["labels"] == "hard"


def test_weighted_labels_trust_the_confident_label_of_a_split_cluster() -> None:
    # Right cluster: half its items labelled b with a posterior of 0.55, half labelled a with 0.95. Hard
    # labels count them alike (P(b) = 0.5); weights 0.55 : 0.95 give P(b) = 0.55 / 1.5; soft targets the
    # mean posterior, (0.55 + 0.05) / 2 = 0.3.
    x = np.concatenate([two_clusters(20), two_clusters(20, seed=1)[20:]])
    y = np.concatenate([np.zeros(20, int), np.ones(20, int), np.zeros(20, int)])
    posterior = np.concatenate(
        [np.tile([1.0, 0.0], (20, 1)), np.tile([0.45, 0.55], (20, 1)), np.tile([0.95, 0.05], (20, 1))]
    )
    right = x[20:]
    fits = {
        mode: p_b(
            train_head(
                x, y, NAMES, toy_backbone(), TrainConfig(head_c=100.0, balance="none", labels=mode), posterior=posterior
            ),
            right,
        )
        for mode in ("hard", "weighted", "soft")
    }
    assert fits["hard"] == pytest.approx(0.5, abs=0.03)
    assert fits["weighted"] == pytest.approx(0.55 / 1.5, abs=0.03)
    assert fits["soft"] == pytest.approx(0.3, abs=0.03)


def test_self_training_keeps_the_soft_targets_and_adds_hard_pseudo_labels() -> None:
    x = two_clusters()
    y = np.repeat([0, 1], 20)
    posterior = np.repeat([[0.8, 0.2], [0.2, 0.8]], 20, axis=0)
    pool = two_clusters(100, seed=2)
    config = TrainConfig(head_c=100.0, labels="soft")
    # The soft head is at most 0.8 sure: no pool item passes a 0.95 threshold, so the labels alone decide.
    none = self_train_head(x, y, pool, NAMES, toy_backbone(), config, posterior=posterior, threshold=0.95)
    assert none.extra["pseudo_labels"] == 0
    assert p_b(none, pool[100:]) == pytest.approx(0.8, abs=0.02)
    # At 0.7 the whole pool joins as one-hot labels, which outnumber the soft ones 5 to 1: surer than 0.8.
    some = self_train_head(x, y, pool, NAMES, toy_backbone(), config, posterior=posterior, threshold=0.7)
    assert some.extra["pseudo_labels"] == 200
    assert p_b(some, pool[100:]) > 0.9
    with pytest.raises(LearnerError, match="posterior"):
        self_train_head(x, y, pool, NAMES, toy_backbone(), config, threshold=0.7)


def test_soft_rows_drop_negligible_classes_and_keep_each_items_mass() -> None:
    posterior = np.array([[0.9995, 0.0005, 0.0], [0.5, 0.3, 0.2]])
    items, classes, w = soft_rows(posterior)
    assert items.tolist() == [0, 1, 1, 1] and classes.tolist() == [0, 0, 1, 2]
    np.testing.assert_allclose(np.bincount(items, weights=w), [1.0, 1.0])


def test_label_weights_are_the_labels_posterior_scaled_to_mean_one() -> None:
    w = label_weights(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]]))
    np.testing.assert_allclose(w, np.array([0.9, 0.6, 0.3]) / 0.6)


@pytest.mark.parametrize(
    ("posterior", "message"),
    [
        (None, "need each label's consensus posterior"),
        (np.ones((3, 2)), "shape"),
        (np.array([[1.0, 0.0], [np.nan, 1.0], [0.5, 0.5], [0.5, 0.5]]), "non-negative"),
        (np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5], [0.5, 0.5]]), "non-negative"),
    ],
)
def test_bad_posteriors_are_refused_with_a_reason(posterior: np.ndarray | None, message: str) -> None:
    x = two_clusters(2)
    with pytest.raises(LearnerError, match=message):
        train_head(x, [0, 0, 1, 1], NAMES, toy_backbone(), TrainConfig(labels="soft"), posterior=posterior)


def test_check_posterior_normalises_rows() -> None:
    np.testing.assert_allclose(check_posterior(np.array([[2.0, 2.0], [0.0, 3.0]]), 2, 2), [[0.5, 0.5], [0.0, 1.0]])


def test_finetune_losses_match_the_hard_loss_at_weight_one_and_the_soft_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 0])
    idx = np.arange(3)
    class_w = torch.tensor([0.5, 2.0])
    hard = _loss(nn.CrossEntropyLoss(weight=class_w), logits, target, idx, None, None, class_w)
    ones = _loss(nn.CrossEntropyLoss(weight=class_w, reduction="none"), logits, target, idx, None, np.ones(3), class_w)
    assert float(ones) == pytest.approx(float(hard))
    # A weight of 0 takes an item out of the sum; the mean is still over the batch.
    half = _loss(nn.CrossEntropyLoss(reduction="none"), logits, target, idx, None, np.array([1.0, 1.0, 0.0]), None)
    per_item = nn.functional.cross_entropy(logits, target, reduction="none")
    assert float(half) == pytest.approx(float(per_item[:2].sum() / 3))
    soft = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    got = _loss(nn.CrossEntropyLoss(), logits, target, idx, soft, None, None)
    expected = -(torch.from_numpy(soft) * torch.log_softmax(logits, 1)).sum(1).mean()
    assert float(got) == pytest.approx(float(expected))


def constant_images() -> list[Image.Image]:
    """Four dark and four bright flat images: two trivially separable 'classes'."""
    return [Image.new("RGB", (32, 32), (30, 30, 30))] * 4 + [Image.new("RGB", (32, 32), (220, 220, 220))] * 4


@pytest.mark.parametrize("mode", ["soft", "weighted"])
def test_finetune_on_the_posterior_is_less_sure_than_on_hard_labels(mode: str) -> None:
    images = constant_images()
    y = np.repeat([0, 1], 4)
    # Soft: each image's crowd leaned 70:30. Weighted: half of each class's labels are 0.55 sure, and those
    # are labelled the other way, so hard labels see a 50:50 split and weights a 0.95 : 0.55 one.
    if mode == "soft":
        posterior = np.repeat([[0.7, 0.3], [0.3, 0.7]], 4, axis=0)
    else:
        y = np.array([0, 0, 1, 1, 1, 1, 0, 0])
        posterior = np.array([[0.95, 0.05]] * 2 + [[0.45, 0.55]] * 2 + [[0.05, 0.95]] * 2 + [[0.55, 0.45]] * 2)
    flat = AugmentConfig(dihedral=False, hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0)
    spec = BackboneSpec(weights="none")
    out = {}
    for labels in ("hard", mode):
        config = TrainConfig(
            mode="finetune", image_size=32, batch_size=8, epochs=40, frozen_epochs=40, lr=0.05, augment=flat,
            labels=labels, balance="none", warmup_fraction=0.0,  # type: ignore[arg-type]
        )  # fmt: skip
        clf = finetune(spec, images, y, NAMES, config, posterior=posterior).classifier
        out[labels] = clf.predict_proba(images)
    dark_b = {k: float(v[:4, 1].mean()) for k, v in out.items()}
    if mode == "soft":
        assert dark_b["hard"] < 0.1  # hard labels: the dark images are surely a
        assert dark_b["soft"] == pytest.approx(0.3, abs=0.1)
    else:
        assert dark_b["hard"] == pytest.approx(0.5, abs=0.1)
        assert dark_b["weighted"] == pytest.approx(0.55 / 1.5, abs=0.1)
