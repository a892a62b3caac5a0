"""A running round's voice: its stage and percent on the round row (which doubles as the heartbeat) and
on the project's websocket group, the time each stage took, and the check for an admin's Cancel."""

from __future__ import annotations

import time

from django.utils import timezone

from .events import broadcast, round_payload
from .models import TrainingRound

# Share of the progress bar each stage takes (start, end).
STAGES = {
    "snapshot": (0, 5),
    "embed": (5, 60),
    "train": (60, 78),
    "evaluate": (78, 82),
    "score": (82, 90),
    "select": (90, 93),
    "map": (93, 96),
    "publish": (96, 100),
}
# Progress is written (and broadcast) at most this often; a stage change is always written.
MIN_WRITE_INTERVAL = 0.5
# The round row is asked for cancel_requested at most this often.
CANCEL_CHECK_INTERVAL = 1.0


class RoundReporter:
    """Progress to the round row (heartbeat) and the project's websocket group; cancellation checks."""

    def __init__(self, round_: TrainingRound) -> None:
        self.round = round_
        self._last_write = 0.0
        self._last_check = 0.0
        self._stage = ""
        self.timings: dict[str, float] = {}
        self._stage_started = time.monotonic()

    def _close_stage(self) -> None:
        now = time.monotonic()
        if self._stage:
            self.timings[self._stage] = round(self.timings.get(self._stage, 0.0) + now - self._stage_started, 3)
        self._stage_started = now

    def stage(self, name: str) -> None:
        self._close_stage()
        self._stage = name
        self.progress(name, 0.0, force=True)

    def finish_timing(self) -> None:
        self._close_stage()
        self._stage = ""

    def progress(self, stage: str, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < MIN_WRITE_INTERVAL:
            return
        start, end = STAGES.get(self._stage or stage, (0, 100))
        percent = start + (end - start) * min(1.0, max(0.0, fraction))
        self._last_write = now
        fields = {"stage": self._stage or stage, "progress": percent, "heartbeat_at": timezone.now()}
        TrainingRound.objects.filter(pk=self.round.pk).update(**fields)
        for key, value in fields.items():
            setattr(self.round, key, value)
        broadcast(self.round.project_id, round_payload(self.round))

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < CANCEL_CHECK_INTERVAL:
            return False
        self._last_check = now
        return TrainingRound.objects.filter(pk=self.round.pk, cancel_requested=True).exists()
