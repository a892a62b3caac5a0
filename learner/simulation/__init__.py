"""Headless active-learning simulation: the platform's own loop with simulated annotators.

A labelled image set (class-per-folder, or a CSV manifest with path, label and group columns; ``items``) is
ingested once into a *source* project (one slide with one patch per image; ``source``). Every run (arm x
seed x setting; ``runs``) then gets a fresh project whose Slide and Patch rows are bulk copies of the
source rows (same files, same checksums, so the embedding cache is shared), minus the test groups. The
loop is the web platform's: ``lease_next_task`` → ``cast_vote`` (consensus) → ``start_round`` +
``run_round`` (in this process, the worker's code) → the round's published tasks. Only the humans are
simulated (``annotators``). Each round's model is measured on the held-out test groups, and the rows,
learning curves and summary are written out (``reports``, ``learning_curves``).

This package's namespace is what ``manage.py simulate`` and the benchmarks use.
"""

from __future__ import annotations

from .annotators import (
    IMPROVING,
    NOISY,
    ORACLE,
    SETTINGS,
    Annotator,
    ImprovingAnnotator,
    Setting,
    annotators,
    confusion_matrix,
)
from .comparison import compare_policies, policy_figures
from .decoding import decoder_accuracies, student_accuracy_by_vote
from .errors import SimulationError
from .items import Item, read_items
from .policies import NEW, POLICIES, TODAY, Policy, checked_fields, parse_setting, policy, with_policy, with_settings
from .reports import RoundsCsv, round_row, write_summary
from .runs import (
    DEFAULT_ARMS,
    DEFAULT_BUDGETS,
    Config,
    Run,
    Split,
    clone_pool,
    simulate,
    simulate_run,
    split_rows,
    start_run,
    train_round,
    work_queue,
)
from .source import SourceSet, source_embeddings, source_project

__all__ = [
    "DEFAULT_ARMS",
    "DEFAULT_BUDGETS",
    "IMPROVING",
    "NEW",
    "NOISY",
    "ORACLE",
    "POLICIES",
    "SETTINGS",
    "TODAY",
    "Annotator",
    "Config",
    "ImprovingAnnotator",
    "Item",
    "Policy",
    "RoundsCsv",
    "Run",
    "Setting",
    "SimulationError",
    "SourceSet",
    "Split",
    "annotators",
    "checked_fields",
    "clone_pool",
    "compare_policies",
    "confusion_matrix",
    "decoder_accuracies",
    "parse_setting",
    "policy",
    "policy_figures",
    "read_items",
    "round_row",
    "simulate",
    "simulate_run",
    "source_embeddings",
    "source_project",
    "split_rows",
    "start_run",
    "student_accuracy_by_vote",
    "train_round",
    "with_policy",
    "with_settings",
    "work_queue",
    "write_summary",
]
