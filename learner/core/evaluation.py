"""Classification metrics over predicted probabilities, returned as a JSON-serialisable dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from learner.core.errors import LearnerError

ECE_BINS = 10


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Top-label ECE: mean |accuracy - confidence| over ECE_BINS equal-width confidence bins, weighted by
    bin size."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def evaluate(y_true: Sequence[int] | np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class sensitivity/specificity, one-vs-rest ROC-AUC,
    Cohen's kappa, confusion matrix (rows = truth, columns = prediction) and calibration error.

    ROC-AUC is None when it is undefined (a class absent from `y_true`); per-class AUCs likewise.
    """
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(proba, dtype=float)
    k = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise LearnerError(f"Expected probabilities of shape ({len(y)}, {k}), got {p.shape}.")
    if len(y) == 0:
        raise LearnerError("Cannot evaluate on an empty set; the held-out set has no labelled items.")
    labels = list(range(k))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    total = cm.sum()
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = int(total - tp - fn - fp)
        auc = None
        if 0 < (y == c).sum() < len(y):
            auc = float(roc_auc_score(y == c, p[:, c]))
        per_class[name] = {
            "support": tp + fn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "roc_auc": auc,
        }
    present = np.unique(y)
    roc_auc = None
    if len(present) == k and k > 1:
        if k == 2:
            roc_auc = float(roc_auc_score(y, p[:, 1]))
        else:
            # renormalise: sklearn insists rows sum to 1 exactly
            roc_auc = float(roc_auc_score(y, p / p.sum(axis=1, keepdims=True), multi_class="ovr", labels=labels))
    kappa = cohen_kappa_score(y, pred, labels=labels)
    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(present) > 0 else None,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "cohen_kappa": None if np.isnan(kappa) else float(kappa),
        "roc_auc_ovr": roc_auc,
        "ece": expected_calibration_error(y, p),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": list(class_names),
    }
