"""Simulated people: annotators with a confusion matrix (who answers what for a patch of a true class), the
labelling settings (a perfect oracle, a noisy crowd with an occasional expert, a crowd of students who
improve with practice), and their user accounts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.contrib.auth import get_user_model

from annotations.models import Role

LEARNING_CURVES = ("linear", "exponential")


@dataclass(frozen=True)
class Annotator:
    """A simulated person: ``confusion[t, v]`` is the chance of voting v for a patch of true class t."""

    name: str
    role: str
    confusion: np.ndarray

    def confusion_at(self, vote: int) -> np.ndarray:
        """The confusion behind the person's ``vote``-th vote of a run (0-based): always the same here."""
        return self.confusion

    def answer(self, truth: int, key: tuple[int, ...], vote: int = 0) -> int:
        # Seeded by (run seed, annotator, image): every arm of a seed hears the same answer for the same image.
        rng = np.random.default_rng(key)
        return int(rng.choice(len(self.confusion), p=self.confusion[truth]))


@dataclass(frozen=True)
class ImprovingAnnotator(Annotator):
    """A student who gets better with practice: per class, accuracy rises from ``start`` to ``end`` over
    their first ``learning_votes`` votes of a run (``linear``), or approaches ``end`` with 95% of the way
    done at ``learning_votes`` (``exponential``, a learning curve), the errors spread evenly as in
    :func:`confusion_matrix`. ``confusion`` is the matrix once learnt (at ``end``)."""

    start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    end: np.ndarray = field(default_factory=lambda: np.zeros(0))
    learning_votes: int = 300
    curve: str = "linear"

    def accuracy_at(self, vote: int) -> np.ndarray:
        """Per-class accuracy behind the ``vote``-th vote (0-based) of the run."""
        if self.curve == "linear":
            progress = min(1.0, vote / self.learning_votes) if self.learning_votes > 0 else 1.0
        else:
            progress = 1.0 - float(np.exp(-3.0 * vote / self.learning_votes)) if self.learning_votes > 0 else 1.0
        return np.asarray(self.start + (self.end - self.start) * progress, dtype=float)

    def confusion_at(self, vote: int) -> np.ndarray:
        return confusion_matrix(self.accuracy_at(vote))

    def answer(self, truth: int, key: tuple[int, ...], vote: int = 0) -> int:
        # Seeded by (run seed, annotator, image, vote index): the same vote of the same image gets the same answer.
        rng = np.random.default_rng((*key, vote))
        confusion = self.confusion_at(vote)
        return int(rng.choice(len(confusion), p=confusion[truth]))


def confusion_matrix(accuracy: np.ndarray) -> np.ndarray:
    """Per-class accuracy on the diagonal, the errors spread evenly over the other classes."""
    k = len(accuracy)
    off = (1.0 - accuracy) / max(1, k - 1)
    matrix = np.repeat(off[:, None], k, axis=1)
    matrix[np.arange(k), np.arange(k)] = accuracy
    return matrix


@dataclass(frozen=True)
class Setting:
    """Who labels: a perfect oracle, or a noisy crowd with votes_required votes and an occasional expert.

    With ``student_start`` set the students improve (:class:`ImprovingAnnotator`): each one's per-class
    accuracy is drawn from ``student_start`` for their first vote and from ``student_end`` once learnt.
    ``project`` holds (Project field, value) pairs set on every run project after everything else (a
    labelling policy, see ``learner.simulation.policies``, which checks them against the model)."""

    name: str
    students: int = 0
    student_accuracy: tuple[float, float] = (0.6, 0.85)
    votes_required: int = 1
    expert_accuracy: float = 1.0
    expert_rate: float = 1.0  # share of contested patches the expert reviews
    gold_rate: float = 0.0  # share of a student's leases that are gold checks
    # The project's adaptive redundancy: votes_required is then the most a patch is asked (annotations.voting).
    adaptive: bool = False
    redundancy_confidence: float = 0.9
    # The project's Project.expert_routing: contested (crowd first) or value (annotations.expert_routing).
    expert_routing: str = "contested"
    student_start: tuple[float, float] | None = None
    student_end: tuple[float, float] = (0.85, 0.85)
    learning_votes: int = 300
    learning_curve: str = "linear"
    project: tuple[tuple[str, Any], ...] = ()
    policy: str = ""  # the name of the policy ``project`` came from, for the reports

    @property
    def improving(self) -> bool:
        return self.student_start is not None


ORACLE = Setting("oracle")
NOISY = Setting("noisy", students=3, votes_required=3, gold_rate=0.1)
# Issue 15's crowd: five students improving from about 0.6 to about 0.85 over their first 300 votes, each
# one's accuracies drawn per class, and an expert right 95% of the time.
IMPROVING = Setting(
    "improving",
    students=5,
    votes_required=3,
    gold_rate=0.1,
    expert_accuracy=0.95,
    student_start=(0.5, 0.7),
    student_end=(0.8, 0.9),
    learning_votes=300,
)
SETTINGS = {"oracle": ORACLE, "noisy": NOISY, "improving": IMPROVING}


def annotators(setting: Setting, k: int, seed: int) -> tuple[Annotator, list[Annotator]]:
    rng = np.random.default_rng([seed, 7919])
    expert = Annotator("expert", Role.EXPERT, confusion_matrix(np.full(k, setting.expert_accuracy)))
    if setting.student_start is not None:
        students: list[Annotator] = []
        for i in range(setting.students):
            start = rng.uniform(*setting.student_start, size=k)
            end = rng.uniform(*setting.student_end, size=k)
            students.append(
                ImprovingAnnotator(
                    f"student{i + 1}",
                    Role.CROWD,
                    confusion_matrix(end),
                    start=start,
                    end=end,
                    learning_votes=setting.learning_votes,
                    curve=setting.learning_curve,
                )
            )
        return expert, students
    low, high = setting.student_accuracy
    students = [
        Annotator(f"student{i + 1}", Role.CROWD, confusion_matrix(rng.uniform(low, high, size=k)))
        for i in range(setting.students)
    ]
    return expert, students


def simulation_users(tag: str, setting: Setting) -> tuple[Any, list[Any]]:
    user_model = get_user_model()

    def user(name: str) -> Any:
        found, _ = user_model.objects.get_or_create(username=f"sim-{tag}-{name}"[:150])
        return found

    return user("expert"), [user(f"student{i + 1}") for i in range(setting.students)]
