"""The record path's rule for rewriting a consensus row (``consensus._changed`` before the bulk recompute ran
on arrays, 0df2001): the reference the array path's ``plan_changes`` is held to, by the integration tests
(tests/integration/test_consensus_arrays.py) and by the benchmark's yardstick
(tests/bench/bench_consensus_recompute.py)."""

from __future__ import annotations

from typing import Any

from annotations import consensus
from annotations.models import Consensus


def record_path_changed(row: Consensus, fields: dict[str, Any]) -> bool:
    """The record path's rule for rewriting a row (consensus._changed before the array path), as the reference."""
    tol = consensus.PROBABILITY_TOLERANCE
    for field, value in fields.items():
        if field == "label":
            if row.label_id != (value.pk if value is not None else None):
                return True
        elif field in ("confidence", "agreement"):
            if abs(getattr(row, field) - value) > tol:
                return True
        elif field == "posterior":
            stored = row.posterior or {}
            if stored.keys() != value.keys() or any(abs(stored[k] - v) > tol for k, v in value.items()):
                return True
        elif getattr(row, field) != value:
            return True
    return False
