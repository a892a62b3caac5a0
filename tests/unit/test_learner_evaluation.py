"""Metrics on hand-made predictions whose values can be checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from learner.core.errors import LearnerError
from learner.core.evaluation import evaluate, expected_calibration_error

CLASSES = ["a", "b", "c"]
# truth:       a a a a b b b c c c
# prediction:  a a a b b b a c c b
Y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])


def one_hot_ish(pred: np.ndarray, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), 3), (1 - confidence) / 2)
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_headline_metrics_match_hand_computation() -> None:
    m = evaluate(Y, one_hot_ish(PRED), CLASSES)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    # recalls: a 3/4, b 2/3, c 2/3
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    # precisions: a 3/4, b 2/4, c 2/2 -> F1 a 0.75, b 4/7, c 0.8
    assert m["macro_f1"] == pytest.approx((0.75 + 4 / 7 + 0.8) / 3)
    # kappa: p_o = 0.7, p_e = (4*4 + 3*4 + 3*2) / 100 = 0.34
    assert m["cohen_kappa"] == pytest.approx((0.7 - 0.34) / (1 - 0.34))
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]


def test_per_class_sensitivity_and_specificity() -> None:
    m = evaluate(Y, one_hot_ish(PRED), CLASSES)
    b = m["per_class"]["b"]
    assert b["support"] == 3
    assert b["sensitivity"] == pytest.approx(2 / 3)
    # negatives for b: 7 items, of which 2 were predicted b (one a, one c)
    assert b["specificity"] == pytest.approx(5 / 7)
    assert m["per_class"]["c"]["specificity"] == pytest.approx(1.0)


def test_roc_auc_is_one_for_a_perfect_ranking_and_half_for_a_constant() -> None:
    perfect = evaluate(Y, one_hot_ish(Y), CLASSES)
    assert perfect["roc_auc_ovr"] == pytest.approx(1.0)
    assert perfect["accuracy"] == 1.0
    constant = evaluate(Y, np.full((10, 3), 1 / 3), CLASSES)
    assert constant["roc_auc_ovr"] == pytest.approx(0.5)


def test_auc_is_none_when_a_class_has_no_examples() -> None:
    m = evaluate(np.array([0, 0, 1, 1]), one_hot_ish(np.array([0, 1, 1, 1])), CLASSES)
    assert m["roc_auc_ovr"] is None
    assert m["per_class"]["c"]["roc_auc"] is None
    assert m["per_class"]["c"]["sensitivity"] is None
    # scores for "a": positives 0.8, 0.1; negatives 0.1, 0.1 -> pairs won 1 + 1, tied 0.5 + 0.5 of 4
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(0.75)


def test_result_is_json_serialisable() -> None:
    m = evaluate(Y, one_hot_ish(PRED), CLASSES)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_calibration_error_of_a_calibrated_and_an_overconfident_model() -> None:
    # 10 predictions at confidence 0.7, 7 of them right: perfectly calibrated
    assert expected_calibration_error(Y, one_hot_ish(PRED, 0.7)) == pytest.approx(0.0, abs=1e-12)
    # the same predictions at confidence 1.0: off by 0.3
    assert expected_calibration_error(Y, one_hot_ish(PRED, 1.0)) == pytest.approx(0.3)


def test_it_rejects_probabilities_of_the_wrong_shape() -> None:
    with pytest.raises(LearnerError, match=r"shape \(10, 3\)"):
        evaluate(Y, np.zeros((10, 2)), CLASSES)
