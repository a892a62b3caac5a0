"""Learning-curve reporting: labels needed to reach a target, the summary table, the CSV and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from learner.simulation import learning_curves as lc


def rows(arm: str, budgets_to_acc: dict[int, list[float]], setting: str = "oracle") -> list[dict]:
    return [
        {"setting": setting, "arm": arm, "seed": seed, "budget": budget, "test_accuracy": acc}
        for budget, accs in budgets_to_acc.items()
        for seed, acc in enumerate(accs)
    ]


def test_labels_to_reach_interpolates_between_budgets() -> None:
    curve = {50: [0.80, 0.82], 100: [0.90], 200: [0.95]}
    assert lc.labels_to_reach(curve, 0.81) == 50  # reached at the first budget
    assert lc.labels_to_reach(curve, 0.855) == pytest.approx(75.0)  # half way from 0.81 to 0.90
    assert lc.labels_to_reach(curve, 0.99) is None


def test_labels_to_reach_uses_the_first_crossing_of_the_mean_curve() -> None:
    curve = {50: [0.70], 100: [0.90], 200: [0.85], 400: [0.95]}
    assert lc.labels_to_reach(curve, 0.88) == pytest.approx(50 + (0.18 / 0.20) * 50)


def test_summary_reports_labels_needed_and_the_ratio_to_random() -> None:
    data = rows("random", {100: [0.80], 200: [0.85], 400: [0.90]}) + rows("margin", {100: [0.85], 200: [0.90]})
    text = lc.summary(data, target=0.90)
    random_line = next(line for line in text.splitlines() if line.strip().startswith("random") and "400" in line)
    margin_line = next(line for line in text.splitlines() if "random/margin" in line)
    assert "400" in random_line
    assert "200" in margin_line and "random/margin = 2.00" in margin_line


def test_summary_default_target_is_randoms_final_accuracy_per_setting() -> None:
    data = rows("random", {100: [0.8], 200: [0.9]}) + rows("margin", {100: [0.95], 200: [0.96]})
    data += rows("random", {100: [0.5], 200: [0.6]}, setting="noisy")
    text = lc.summary(data)
    assert "[oracle]" in text and "[noisy]" in text
    assert "test_accuracy 0.900" in text and "test_accuracy 0.600" in text
    assert "random/margin = 2.00" in text  # margin reaches 0.9 at 100 labels, random at 200


def test_csv_and_plot_are_written(tmp_path: Path) -> None:
    data = rows("random", {50: [0.7, 0.72], 100: [0.8, 0.79]}) + rows("margin", {50: [0.75, 0.7], 100: [0.9, 0.88]})
    lc.write_csv(data, tmp_path / "out" / "rounds.csv")
    with (tmp_path / "out" / "rounds.csv").open() as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 8 and read[0].keys() >= {"arm", "seed", "budget", "test_accuracy"}
    lc.plot(data, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cost_rows(setting: str, arm: str, points: dict[int, list[tuple[float, float]]]) -> list[dict]:
    """points: {budget: [(cost, accuracy) per seed]}"""
    return [
        {"setting": setting, "arm": arm, "seed": seed, "budget": budget, "cost": cost, "test_accuracy": acc,
         "expert_cost": 10.0, "crowd_cost": 1.0}
        for budget, per_seed in points.items()
        for seed, (cost, acc) in enumerate(per_seed)
    ]  # fmt: skip


def test_cost_to_reach_and_value_at_cost_interpolate_on_the_mean_curve() -> None:
    curve = lc.cost_curves(cost_rows("noisy", "random", {50: [(100, 0.7), (140, 0.8)], 100: [(300, 0.9)]}))
    points = curve[("noisy", "random")]
    assert lc.cost_to_reach(points, 0.74) == 120  # reached at the first budget's mean cost
    assert lc.cost_to_reach(points, 0.825) == pytest.approx(120 + 0.5 * 180)
    assert lc.cost_to_reach(points, 0.95) is None
    assert lc.value_at_cost(points, 210) == pytest.approx(0.825)
    assert lc.value_at_cost(points, 50) is None and lc.value_at_cost(points, 301) is None


def test_the_cost_summary_compares_each_policy_with_the_fixed_one_at_equal_accuracy_and_equal_cost() -> None:
    rows = cost_rows("noisy", "margin", {50: [(150, 0.80)], 100: [(300, 0.90)]})
    rows += cost_rows("noisy-adaptive", "margin", {50: [(100, 0.80)], 100: [(200, 0.88)]})
    text = "\n".join(lc.cost_summary(rows))
    assert "against annotation cost (expert 10 : crowd 1" in text
    # Both reach 0.88 (adaptive's final): noisy at 150 + 0.8 x 150 = 270, adaptive at 200, 74% of it.
    assert "cost to reach test_accuracy 0.880 / test_accuracy at cost 200" in text
    adaptive = next(line for line in text.splitlines() if line.strip().startswith("noisy-adaptive") and "%" in line)
    assert "200" in adaptive and "74% of noisy's cost" in adaptive
    # At cost 200 noisy had 0.80 + 50/150 x 0.10 = 0.833: adaptive is 4.67 points above.
    assert "+4.67 points" in adaptive
    assert lc.cost_summary([{k: v for k, v in r.items() if k != "cost"} for r in rows]) == []
