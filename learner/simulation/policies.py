"""Labelling policies: what a project is set to, as (Project field, value) pairs a simulation applies to its run
projects, so that today's way of spending votes and the new one are compared on the same crowd, seeds and
splits, and every decision the policy makes is the platform's (the queue, the votes, the rounds).

A policy names project fields; each name is checked against the Project model and each value with that
field's own validation (choices, bounds), and a name the model lacks is refused with the fields it has:
a policy can never be half applied. ``--policy`` and ``--project-setting NAME=VALUE`` on ``manage.py
simulate`` use the same check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import models

from annotations.models import Project

from .annotators import Setting
from .errors import SimulationError

# Fields a run project takes from the source project or from the run itself (the arm, the seed): a policy
# that changed them would no longer be compared on the same pool, embeddings and draws (and the loop sets
# batch_size before every round to reach the next budget).
RESERVED_FIELDS = frozenset(
    {
        "id", "name", "description", "patch_size", "magnification", "backbone", "backbone_weights", "seed",
        "query_strategy", "random_fraction", "batch_size", "created_by", "created_at",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Policy:
    name: str
    fields: tuple[tuple[str, Any], ...]
    description: str = ""


# Today's: every crowd patch gets votes_required votes, a contested patch goes to the experts, and the rounds
# train on the consensus labels as if they were certain.
TODAY = Policy(
    "today",
    (
        ("votes_required", 3),
        ("contested_threshold", 0.34),
        ("adaptive_redundancy", False),
        ("redundancy_model_prior", False),
        ("training_labels", "hard"),
        ("expert_routing", "contested"),
        ("adaptive_gold", False),
        ("certification_threshold", 0.0),
    ),
    "3 votes per patch, contested patches (a third of the votes against) to the expert, hard labels, one gold rate",
)
# The new one (issue 15), as measured best by bench_crowd_policy (README "Students who improve, and labelling
# policies"): the crowd is asked until a patch's consensus is confident, weighing the votes by the model's
# posterior for the patch (one vote may do), up to 5 votes where they are split, and a patch goes to the expert
# only when the crowd stays split at that cap (more than 45% against); the rounds weight each label by its
# consensus posterior. Routing by value and the adaptive gold rate are platform settings the same benchmark
# measured as costlier here (README), so the new policy leaves them off; certification stays off (a student's
# votes count from their first, as today's; try --project-setting certification_threshold=0.7).
NEW = Policy(
    "new",
    (
        ("votes_required", 5),
        ("contested_threshold", 0.45),
        ("adaptive_redundancy", True),
        ("redundancy_confidence", 0.85),
        ("redundancy_model_prior", True),
        ("training_labels", "weighted"),
        ("expert_routing", "contested"),
        ("adaptive_gold", False),
        ("certification_threshold", 0.0),
    ),
    "adaptive redundancy weighed by the model's posterior, up to 5 votes, experts only for a split at the cap, "
    "posterior-weighted labels",
)

POLICIES = {p.name: p for p in (TODAY, NEW)}


def project_field(name: str) -> models.Field[Any, Any]:
    """The Project model field a policy may set, or a SimulationError that says what is wrong."""
    try:
        found = Project._meta.get_field(name)
    except FieldDoesNotExist:
        settable = sorted(
            f.name
            for f in Project._meta.concrete_fields
            if f.name not in RESERVED_FIELDS and not f.is_relation and f.editable
        )
        raise SimulationError(
            f"Project has no field {name!r}; a project setting is one of: {', '.join(settable)}."
        ) from None
    if name in RESERVED_FIELDS or not isinstance(found, models.Field) or found.is_relation or not found.editable:
        raise SimulationError(f"Project.{name} cannot be set by a simulation policy (the run sets it itself).")
    return found


def checked_fields(pairs: Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """The pairs with each value cleaned by its Project field (choices, validators); refuses unknown or
    reserved names, bad values and a name given twice."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        field = project_field(name)
        if name in out:
            raise SimulationError(f"Project.{name} is set twice.")
        try:
            out[name] = field.clean(value, None)
        except ValidationError as exc:
            raise SimulationError(f"Project.{name} = {value!r} is refused: {' '.join(exc.messages)}") from None
    return tuple(out.items())


def parse_setting(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` from the command line: the value as JSON when it parses (true, 0.8, 5), else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise SimulationError(f"A project setting is NAME=VALUE, e.g. adaptive_redundancy=true; not {text!r}.")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def policy(name: str) -> Policy:
    if name not in POLICIES:
        raise SimulationError(f"Unknown policy {name!r}; choose from {', '.join(POLICIES)}.")
    found = POLICIES[name]
    return replace(found, fields=checked_fields(found.fields))


def with_policy(setting: Setting, chosen: Policy, extra: Iterable[tuple[str, Any]] = ()) -> Setting:
    """``setting`` run under ``chosen`` (named ``<setting>-<policy>``), plus ``extra`` project settings for
    every policy; an extra setting that a policy also sets is refused rather than silently winning."""
    extra = checked_fields(extra)
    clash = sorted({n for n, _ in extra} & {n for n, _ in chosen.fields})
    if clash:
        raise SimulationError(
            f"Policy {chosen.name!r} sets {', '.join(clash)} itself; leave it out of the project settings."
        )
    return replace(
        setting,
        name=f"{setting.name}-{chosen.name}",
        project=checked_fields((*chosen.fields, *extra)),
        policy=chosen.name,
    )


def with_settings(setting: Setting, extra: Iterable[tuple[str, Any]]) -> Setting:
    """``setting`` with ``extra`` project settings on its run projects (no policy)."""
    return replace(setting, project=checked_fields((*setting.project, *extra)))
