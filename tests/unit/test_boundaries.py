"""The pure layers (annotations/domain, learner/core, and a few pure modules beside Django code) import no
Django, Celery or Channels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [ROOT / "annotations" / "domain", ROOT / "learner" / "core"]
# Pure modules that live beside Django code in their package.
PURE_FILES = [ROOT / "learner" / "simulation" / "items.py", ROOT / "learner" / "simulation" / "learning_curves.py"]
FORBIDDEN = ("django", "rest_framework", "celery", "channels", "annotations.models", "learner.models")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path", [p for folder in PURE for p in sorted(folder.glob("*.py"))] + PURE_FILES, ids=lambda p: p.name
)
def test_pure_modules_import_no_framework(path: Path) -> None:
    bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text("from django.db import models\nimport numpy\n")
    assert "django.db" in imported_modules(module)
