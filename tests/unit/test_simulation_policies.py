"""Students who improve, and labelling policies as checked project settings (issue 15's benchmark)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from annotations.models import Project
from learner import simulation as sim
from learner.simulation.annotators import ImprovingAnnotator, confusion_matrix


def student(curve: str = "linear") -> ImprovingAnnotator:
    start, end = np.array([0.4, 0.5, 0.6]), np.array([0.9, 0.8, 0.95])
    return ImprovingAnnotator(
        "s", "crowd", confusion_matrix(end), start=start, end=end, learning_votes=100, curve=curve
    )


def test_a_linear_student_goes_from_start_to_end_over_the_learning_votes_and_stays() -> None:
    s = student()
    assert np.allclose(s.accuracy_at(0), [0.4, 0.5, 0.6])
    assert np.allclose(s.accuracy_at(50), [0.65, 0.65, 0.775])
    assert np.allclose(s.accuracy_at(100), s.end) and np.allclose(s.accuracy_at(5000), s.end)
    confusion = s.confusion_at(50)
    assert np.allclose(confusion.sum(axis=1), 1) and np.allclose(np.diag(confusion), s.accuracy_at(50))


def test_an_exponential_student_rises_steeply_first_and_is_95_percent_of_the_way_at_the_learning_votes() -> None:
    s = student("exponential")
    gains = np.diff([s.accuracy_at(n)[0] for n in (0, 25, 50, 75, 100)])
    assert (gains > 0).all() and (np.diff(gains) < 0).all()
    done = (s.accuracy_at(100) - s.start) / (s.end - s.start)
    assert np.allclose(done, 1 - np.exp(-3))


def test_an_answer_is_fixed_by_seed_annotator_image_and_vote_index_and_follows_the_confusion_at_that_vote() -> None:
    s = student()
    assert s.answer(0, (3, 1, 17), 5) == s.answer(0, (3, 1, 17), 5)
    early = np.mean([s.answer(0, (0, 1, row), 0) == 0 for row in range(3000)])
    late = np.mean([s.answer(0, (0, 1, row), 100) == 0 for row in range(3000)])
    assert abs(early - 0.4) < 0.03 and abs(late - 0.9) < 0.03


def test_the_improving_setting_draws_different_students_who_all_improve() -> None:
    expert, students = sim.annotators(sim.IMPROVING, 3, seed=0)
    assert len(students) == 5 and np.allclose(np.diag(expert.confusion), 0.95)
    starts = np.array([s.accuracy_at(0) for s in students])  # type: ignore[attr-defined]
    ends = np.array([s.accuracy_at(300) for s in students])  # type: ignore[attr-defined]
    assert ((0.5 <= starts) & (starts <= 0.7)).all() and ((0.8 <= ends) & (ends <= 0.9)).all()
    assert len({tuple(np.round(s, 6)) for s in starts}) == 5
    # Another seed, other students; the same seed, the same ones.
    assert not np.allclose(starts, [s.accuracy_at(0) for s in sim.annotators(sim.IMPROVING, 3, seed=1)[1]])  # type: ignore[attr-defined]
    assert np.allclose(starts, [s.accuracy_at(0) for s in sim.annotators(sim.IMPROVING, 3, seed=0)[1]])  # type: ignore[attr-defined]


def test_a_fixed_annotator_ignores_the_vote_index_so_earlier_runs_hear_the_same_answers() -> None:
    _, (first, *_) = sim.annotators(sim.NOISY, 3, seed=0)
    assert [first.answer(1, (0, 1, r)) for r in range(50)] == [first.answer(1, (0, 1, r), 99) for r in range(50)]


def test_policies_set_project_fields_by_name_and_new_turns_on_adaptive_redundancy_and_weighted_labels() -> None:
    today, new = sim.policy("today"), sim.policy("new")
    assert dict(today.fields)["adaptive_redundancy"] is False and dict(today.fields)["training_labels"] == "hard"
    assert dict(new.fields)["adaptive_redundancy"] is True and dict(new.fields)["training_labels"] == "weighted"
    for found in (today, new):
        for name, value in found.fields:
            Project._meta.get_field(name).clean(value, None)
    setting = sim.with_policy(sim.IMPROVING, new, [("gold_rate", 0.2)])
    assert setting.name == "improving-new" and setting.policy == "new"
    assert dict(setting.project) == {**dict(new.fields), "gold_rate": 0.2}


def test_an_unknown_field_is_refused_with_the_fields_a_project_has() -> None:
    with pytest.raises(sim.SimulationError, match=r"Project has no field 'expert_routin'.*adaptive_redundancy"):
        sim.checked_fields([("expert_routin", "value")])
    with pytest.raises(sim.SimulationError, match="Unknown policy 'tomorrow'"):
        sim.policy("tomorrow")


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (("training_labels", "fuzzy"), "not a valid choice"),
        (("redundancy_confidence", 2), "less than or equal to 1"),
        (("votes_required", 0), "greater than or equal to 1"),
        (("seed", 3), "cannot be set by a simulation policy"),
        (("batch_size", 3), "cannot be set by a simulation policy"),
        (("created_by", 1), "cannot be set by a simulation policy"),
    ],
)
def test_a_bad_value_or_a_field_the_run_sets_itself_is_refused(pair: tuple[str, object], message: str) -> None:
    with pytest.raises(sim.SimulationError, match=message):
        sim.checked_fields([pair])


def test_a_project_setting_that_the_policy_sets_too_is_refused_not_silently_overridden() -> None:
    with pytest.raises(sim.SimulationError, match="sets adaptive_redundancy itself"):
        sim.with_policy(sim.IMPROVING, sim.policy("new"), [("adaptive_redundancy", False)])
    with pytest.raises(sim.SimulationError, match="set twice"):
        sim.checked_fields([("gold_rate", 0.1), ("gold_rate", 0.2)])


def test_command_line_settings_parse_json_values_and_refuse_a_missing_value() -> None:
    assert sim.parse_setting("adaptive_redundancy=true") == ("adaptive_redundancy", True)
    assert sim.parse_setting("redundancy_confidence=0.8") == ("redundancy_confidence", 0.8)
    assert sim.parse_setting("training_labels=soft") == ("training_labels", "soft")
    with pytest.raises(sim.SimulationError, match="NAME=VALUE"):
        sim.parse_setting("adaptive_redundancy")


def test_the_new_policy_weighs_votes_by_the_model_and_asks_more_before_an_expert_and_today_does_neither() -> None:
    today, new = dict(sim.policy("today").fields), dict(sim.policy("new").fields)
    keys = ("adaptive_redundancy", "redundancy_model_prior", "votes_required", "contested_threshold")
    assert tuple(today[k] for k in keys) == (False, False, 3, 0.34)
    assert tuple(new[k] for k in keys) == (True, True, 5, 0.45)
    # Routing by value and the adaptive gold rate measured costlier: both policies leave them off, and say so.
    assert (today["expert_routing"], today["adaptive_gold"]) == (new["expert_routing"], new["adaptive_gold"])
    # Each policy says every field it compares (neither inherits a default), but the confidence matters only
    # when redundancy is adaptive.
    assert set(new) - set(today) == {"redundancy_confidence"} and set(today) <= set(new)
    with pytest.raises(sim.SimulationError, match="expert_routing"):
        sim.checked_fields([("expert_routing", "cheapest")])


def test_a_hand_made_setting_with_an_unknown_field_fails_before_any_project_is_made() -> None:
    bad = replace(sim.IMPROVING, project=(("expert_routing_by_magic", "value"),))
    with pytest.raises(sim.SimulationError, match="no field 'expert_routing_by_magic'"):
        sim.start_run(None, None, "margin", bad, sim.Config())  # type: ignore[arg-type]
