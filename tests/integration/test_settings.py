"""The settings module: `check` and `check --deploy` are clean, bad production config is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )


def test_check_is_clean_in_development() -> None:
    result = manage("check", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_deploy_check_is_clean_with_debug_off_and_a_real_secret() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", DEBUG="0", SECRET_KEY="k3y-" + "x9Qz" * 16)
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_without_a_secret_key_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env={**env, "DEBUG": "0"}, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG=0" in result.stderr
