"""Exceptions raised by the learner core; messages are sentences a user can act on."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]


class Cancelled(Exception):
    """Raised when the caller's `should_stop()` turned true; nothing half-written is left behind."""


class LearnerError(ValueError):
    """Bad input to the learner core (unknown backbone, unreadable weights, too few labels...)."""


def check_stop(should_stop: StopFn | None, stage: str = "") -> None:
    if should_stop is not None and should_stop():
        raise Cancelled(f"Stopped on request during {stage or 'work'}.")


def report(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, min(1.0, max(0.0, float(fraction))))
