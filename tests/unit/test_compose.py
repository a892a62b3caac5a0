"""docker/compose.yml, read as the YAML it is (Docker cannot run here): production restarts
whatever dies, and runs exactly one Celery beat for the periodic checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yml"


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_long_running_service_is_restarted_when_it_dies() -> None:
    found = services()
    assert found["migrate"]["restart"] == "no"  # runs once
    for name, service in found.items():
        if name != "migrate":
            assert service.get("restart") == "unless-stopped", name


def test_one_beat_sends_the_periodic_checks() -> None:
    beats = [name for name, service in services().items() if "beat" in service.get("command", [])]
    assert beats == ["beat"]
    assert services()["beat"]["command"][:4] == ["celery", "-A", "histoloop", "beat"]
