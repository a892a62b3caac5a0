"""The simulation's one error: bad input, or a loop that cannot go on; the message says what to fix."""

from __future__ import annotations


class SimulationError(Exception):
    """Bad input or a loop that cannot go on; the message says what to fix."""
