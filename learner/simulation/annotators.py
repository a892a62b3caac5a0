"""Simulated people: annotators with a confusion matrix (who answers what for a patch of a true class), the
labelling settings (a perfect oracle, a noisy crowd with an occasional expert), and their user accounts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from django.contrib.auth import get_user_model

from annotations.models import Role


@dataclass(frozen=True)
class Annotator:
    """A simulated person: ``confusion[t, v]`` is the chance of voting v for a patch of true class t."""

    name: str
    role: str
    confusion: np.ndarray

    def answer(self, truth: int, key: tuple[int, ...]) -> int:
        # Seeded by (run seed, annotator, image): every arm of a seed hears the same answer for the same image.
        rng = np.random.default_rng(key)
        return int(rng.choice(len(self.confusion), p=self.confusion[truth]))


def confusion_matrix(accuracy: np.ndarray) -> np.ndarray:
    """Per-class accuracy on the diagonal, the errors spread evenly over the other classes."""
    k = len(accuracy)
    off = (1.0 - accuracy) / max(1, k - 1)
    matrix = np.repeat(off[:, None], k, axis=1)
    matrix[np.arange(k), np.arange(k)] = accuracy
    return matrix


@dataclass(frozen=True)
class Setting:
    """Who labels: a perfect oracle, or a noisy crowd with votes_required votes and an occasional expert."""

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


ORACLE = Setting("oracle")
NOISY = Setting("noisy", students=3, votes_required=3, gold_rate=0.1)
SETTINGS = {"oracle": ORACLE, "noisy": NOISY}


def annotators(setting: Setting, k: int, seed: int) -> tuple[Annotator, list[Annotator]]:
    rng = np.random.default_rng([seed, 7919])
    expert = Annotator("expert", Role.EXPERT, confusion_matrix(np.full(k, setting.expert_accuracy)))
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
