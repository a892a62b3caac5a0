"""One run (arm x seed x setting) of the simulation, through the platform's own loop: the run's pool project
(bulk copies of the source rows minus the held-out test groups), its simulated people working the queue
(``lease_next_task`` → ``cast_vote``), and its rounds (``start_round`` + ``run_round`` in this process, the
worker's code). Then every run of a Config, each round measured on the test groups (see reports)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import transaction

from annotations import queue, voting
from annotations.models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Role, Slide
from learner import pipeline, services
from learner.models import TrainingRound

from .annotators import NOISY, ORACLE, Annotator, Setting, annotators, simulation_users
from .errors import SimulationError
from .policies import checked_fields
from .reports import round_row
from .source import Progress, SourceSet, source_embeddings

DEFAULT_ARMS = ("random", "least_confidence", "margin", "entropy", "diverse")
DEFAULT_BUDGETS = (50, 100, 200, 400, 750)
FINAL = (Consensus.Status.AGREED, Consensus.Status.EXPERT)


@dataclass(frozen=True)
class Config:
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: tuple[Setting, ...] = (ORACLE, NOISY)
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    test_fraction: float = 0.2
    gold_size: int = 150  # expert-labelled validation patches, held out by group like the test set
    gold_per_group: int = 4
    random_fraction: float = 0.0  # the platform's in-batch random control; 0 keeps the arms pure
    write_scores: bool = False
    extra_heads: bool = True  # also score a plain head (no self-training) on the final labels (analysis)
    training_labels: str = "hard"  # the run projects' Project.training_labels: hard, soft or weighted
    run_tag: str = ""
    # Keep every class on both sides of the split (test and pool), grouped where the groups allow it.
    stratify: bool = False
    # The pool projects' relative vote costs (Project.expert_cost / crowd_cost): the rows' cost column.
    expert_cost: float = 10.0
    crowd_cost: float = 1.0


@dataclass
class Split:
    seed: int
    test_rows: np.ndarray
    pool_rows: np.ndarray  # the pool project's non-gold patches
    gold_rows: np.ndarray
    # What the split does to the classes, said loudly in the summary: a class missing from the pool or the
    # test set (a grouped split can leave one out when it lives in few groups), or split by image.
    warnings: tuple[str, ...] = ()


def split_rows(source: SourceSet, cfg: Config, seed: int) -> Split:
    """Test groups, then gold groups, drawn by group (never by image); the rest is the pool.

    With ``cfg.stratify`` the test groups are stratified by class (scikit-learn's StratifiedGroupKFold) and
    every class keeps a pool group; a class that lives in a single group is split by image, and said so."""
    if cfg.stratify:
        return _stratified_split(source, cfg, seed)
    rng = np.random.default_rng([seed, 104729])
    groups = np.unique(source.groups)
    rng.shuffle(groups)
    n_test = max(1, round(cfg.test_fraction * len(groups)))
    n_gold = _gold_groups_wanted(cfg)
    if n_test + n_gold >= len(groups):
        raise SimulationError(f"{len(groups)} groups are too few for a test set and {n_gold} gold groups.")
    test = np.isin(source.groups, groups[:n_test])
    gold_group = np.isin(source.groups, groups[n_test : n_test + n_gold])
    gold_rows: list[int] = []
    for group in groups[n_test : n_test + n_gold]:
        members = np.flatnonzero(source.groups == group)
        gold_rows.extend(rng.choice(members, size=min(cfg.gold_per_group, len(members)), replace=False))
    return _finished(source, seed, test, gold_group, gold_rows, cfg.gold_size, [])


def _gold_groups_wanted(cfg: Config) -> int:
    return -(-cfg.gold_size // cfg.gold_per_group) if cfg.gold_size else 0


def _finished(
    source: SourceSet,
    seed: int,
    test: np.ndarray,
    gold_group: np.ndarray,
    gold_rows: list[int],
    gold_size: int,
    notes: list[str],
) -> Split:
    split = Split(
        seed=seed,
        test_rows=np.flatnonzero(test),
        pool_rows=np.flatnonzero(~test & ~gold_group),
        gold_rows=np.array(sorted(gold_rows)[:gold_size], dtype=np.int64),
    )
    split.warnings = (*coverage_warnings(source, split), *notes)
    return split


def coverage_warnings(source: SourceSet, split: Split) -> list[str]:
    """A sentence per class that the test set or the training pool lacks (and the gold set, when there is
    one): a class absent from the pool can never be labelled, so every arm's curve is capped; one absent
    from the test set is never measured."""
    out = []
    sides = [("training pool", split.pool_rows, "no label of it can be asked for, so every curve is capped")]
    sides.append(("test set", split.test_rows, "its accuracy is never measured"))
    if len(split.gold_rows):
        sides.append(("gold (validation) set", split.gold_rows, "the rounds' validation never sees it"))
    for side, rows, consequence in sides:
        present = set(source.labels[rows].tolist())
        for index, name in enumerate(source.class_names):
            if index not in present:
                n_groups = len(set(source.groups[source.labels == index].tolist()))
                out.append(
                    f"seed {split.seed}: class {name!r} ({n_groups} group(s)) has no image in the {side}: {consequence}"
                )
    return out


def _stratified_split(source: SourceSet, cfg: Config, seed: int) -> Split:
    """Test groups by StratifiedGroupKFold (one fold of round(1 / test_fraction)), gold groups spread over the
    classes without taking a class's last pool group, then a repair for any class still missing on a side:
    move one of its groups across if it has two or more there, else split its group by image (noted)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = source.labels, source.groups
    rng = np.random.default_rng([seed, 104729, 1])
    n_splits = max(2, round(1 / cfg.test_fraction)) if cfg.test_fraction > 0 else 2
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only N members": the repair below deals with such classes.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sklearn\.")
        _, test_idx = next(folds.split(np.zeros(len(labels)), labels, groups))
    test = np.zeros(len(labels), dtype=bool)
    test[test_idx] = True
    notes: list[str] = []
    for index, name in enumerate(source.class_names):
        if not (test & (labels == index)).any():
            _move_class(rng, labels, groups, test, index, to_test=True, fraction=cfg.test_fraction, name=name,
                        notes=notes, seed=seed)  # fmt: skip
    gold_groups = _spread_gold_groups(rng, labels, groups, test, _gold_groups_wanted(cfg))
    gold_group = np.isin(groups, gold_groups) & ~test
    for index, name in enumerate(source.class_names):
        if not (~test & ~gold_group & (labels == index)).any():
            gold_group &= labels != index  # the pool comes first: a gold group of this class gives it back
            if not (~test & ~gold_group & (labels == index)).any():
                _move_class(rng, labels, groups, test, index, to_test=False, fraction=cfg.test_fraction, name=name,
                            notes=notes, seed=seed)  # fmt: skip
    if not test.any() or test.all():
        raise SimulationError(f"{len(labels)} images are too few to stratify a test set.")
    gold_rows: list[int] = []
    for group in gold_groups:
        members = np.flatnonzero((groups == group) & gold_group)
        if len(members):
            gold_rows.extend(rng.choice(members, size=min(cfg.gold_per_group, len(members)), replace=False))
    return _finished(source, seed, test, gold_group, gold_rows, cfg.gold_size, notes)


def _move_class(
    rng: np.random.Generator,
    labels: np.ndarray,
    groups: np.ndarray,
    test: np.ndarray,
    index: int,
    *,
    to_test: bool,
    fraction: float,
    name: str,
    notes: list[str],
    seed: int,
) -> None:
    """Give the side that lacks class ``index`` some of it: a whole group when the other side has two or
    more of its groups, else a share of its images (the group is then split by image, and noted)."""
    source_side = ~test if to_test else test
    rows = np.flatnonzero(source_side & (labels == index))
    if len(rows) == 0:
        return
    its_groups = np.unique(groups[rows])
    if len(its_groups) >= 2:
        group = rng.choice(its_groups)
        test[(groups == group) & source_side] = to_test
        return
    if len(rows) < 2:
        return  # one image cannot be on both sides: coverage_warnings says so
    share = fraction if to_test else 1 - fraction
    moved = rng.choice(rows, size=min(len(rows) - 1, max(1, round(share * len(rows)))), replace=False)
    test[moved] = to_test
    notes.append(
        f"seed {seed}: class {name!r} lives in one group ({its_groups[0]}), split by image to put it on both sides: "
        "near-copies of its images may be in both the pool and the test set"
    )


def _spread_gold_groups(
    rng: np.random.Generator, labels: np.ndarray, groups: np.ndarray, test: np.ndarray, wanted: int
) -> list[Any]:
    """``wanted`` non-test groups, taken from the classes in turn (a group's class is its commonest label),
    never a class's last pool group."""
    if not wanted:
        return []
    candidates = np.unique(groups[~test])
    rng.shuffle(candidates)
    by_class: dict[int, list[Any]] = {}
    for group in candidates:
        members = labels[(groups == group) & ~test]
        by_class.setdefault(int(np.bincount(members).argmax()), []).append(group)
    chosen: list[Any] = []
    while len(chosen) < wanted:
        took = False
        for queue_ in by_class.values():
            if len(queue_) > 1 and len(chosen) < wanted:  # leave each class at least one pool group
                chosen.append(queue_.pop())
                took = True
        if not took:
            break
    return chosen


SLIDE_FIELDS = (
    "name", "file", "format", "status", "width", "height", "levels", "mpp", "magnification",
    "checksum", "size_bytes", "thumbnail", "group", "metadata",
)  # fmt: skip
PATCH_FIELDS = ("x", "y", "size", "magnification", "tissue_fraction")


def clone_pool(
    source: SourceSet, rows: np.ndarray, gold: set[int], name: str, **fields: Any
) -> tuple[Project, dict[int, int]]:
    """A new project over the same files: bulk copies of the source slides and patches of ``rows``.

    Returns the project and {new patch id: source row}. Same checksums and geometry, so the rounds
    hit the embedding cache the source filled.
    """
    src = source.project
    with transaction.atomic():
        project = Project.objects.create(
            name=name, patch_size=src.patch_size, magnification=src.magnification, backbone=src.backbone, **fields
        )
        LabelClass.objects.bulk_create(
            [
                LabelClass(project=project, name=lc.name, colour=lc.colour, hotkey=lc.hotkey, order=lc.order)
                for lc in LabelClass.objects.filter(project=src)
            ]
        )
        slide_ids = [int(source.slide_ids[r]) for r in rows]
        slide_values = {v.pop("id"): v for v in Slide.objects.filter(pk__in=slide_ids).values("id", *SLIDE_FIELDS)}
        new_slides = []
        for sid in slide_ids:
            values = dict(slide_values[sid])
            # The file path names the class folder: keep the truth out of the pool project.
            values["metadata"] = {k: v for k, v in values["metadata"].items() if not k.startswith("sim_")}
            new_slides.append(Slide(project=project, **values))
        Slide.objects.bulk_create(new_slides, batch_size=2000)
        patch_ids = [int(source.patch_ids[r]) for r in rows]
        patch_values = {v.pop("id"): v for v in Patch.objects.filter(pk__in=patch_ids).values("id", *PATCH_FIELDS)}
        new_patches = [
            Patch(project=project, slide=slide, is_gold=int(r) in gold, **patch_values[pid])
            for slide, pid, r in zip(new_slides, patch_ids, rows, strict=True)
        ]
        Patch.objects.bulk_create(new_patches, batch_size=2000)
    return project, {p.pk: int(r) for p, r in zip(new_patches, rows, strict=True)}


@dataclass
class Run:
    """One arm x seed x setting: the pool project, who works on it, and what the truth is."""

    source: SourceSet
    split: Split
    arm: str
    setting: Setting
    project: Project
    truth: dict[int, int]  # patch id -> true class
    row_of: dict[int, int]  # patch id -> source row
    expert: tuple[Any, Annotator]
    students: list[tuple[Any, Annotator]]
    gold_ids: set[int] = field(default_factory=set)
    # Each person's votes so far in this run (0: the expert, 1..: the students), and at which of their votes
    # they answered each patch: an improving student's answer depends on it, and so does the decoder that
    # knows every vote's true confusion (learner.simulation.decoding).
    votes_so_far: dict[int, int] = field(default_factory=dict)
    vote_index: dict[tuple[int, int], int] = field(default_factory=dict)

    def answer(self, person: Annotator, index: int, patch_id: int) -> str:
        """Person ``index``'s answer for the patch as their next vote, counted as cast."""
        row = self.row_of[patch_id]
        vote = self.votes_so_far.get(index, 0)
        self.votes_so_far[index] = vote + 1
        self.vote_index[(index, patch_id)] = vote
        return self.source.class_names[person.answer(self.truth[patch_id], (self.split.seed, index, row), vote)]

    def person_of(self) -> dict[int, tuple[int, Annotator]]:
        """{user id: (person index, annotator)}: 0 is the expert, 1.. the students."""
        people = {self.expert[0].pk: (0, self.expert[1])}
        people.update({user.pk: (i, person) for i, (user, person) in enumerate(self.students, 1)})
        return people


def start_run(source: SourceSet, split: Split, arm: str, setting: Setting, cfg: Config) -> Run:
    # The setting's policy (project field overrides), checked against the model again here, before anything is
    # made, so a Setting made by hand cannot name a field the model lacks either; it is applied last.
    overrides = checked_fields(setting.project)
    rows = np.concatenate([split.pool_rows, split.gold_rows])
    name = f"sim {cfg.run_tag} {setting.name} {arm} seed {split.seed}"
    fields: dict[str, Any] = {
        "query_strategy": arm,
        "random_fraction": 1.0 if arm == "random" else cfg.random_fraction,
        "votes_required": setting.votes_required,
        "gold_rate": setting.gold_rate,
        "adaptive_redundancy": setting.adaptive,
        "redundancy_confidence": setting.redundancy_confidence,
        "expert_routing": setting.expert_routing,
        "expert_cost": cfg.expert_cost,
        "crowd_cost": cfg.crowd_cost,
        "seed": split.seed,
        "training_labels": cfg.training_labels,
        "description": "Simulated run (learner.simulation).",
    }
    fields.update(overrides)
    project, row_of = clone_pool(source, rows, set(split.gold_rows.tolist()), name, **fields)
    expert_user, student_users = simulation_users(cfg.run_tag, setting)
    expert, students = annotators(setting, len(source.class_names), split.seed)
    Membership.objects.bulk_create(
        [Membership(user=expert_user, project=project, role=Role.EXPERT)]
        + [Membership(user=u, project=project, role=Role.CROWD) for u in student_users]
    )
    run = Run(
        source=source,
        split=split,
        arm=arm,
        setting=setting,
        project=project,
        truth={pid: int(source.labels[r]) for pid, r in row_of.items()},
        row_of=row_of,
        expert=(expert_user, expert),
        students=list(zip(student_users, students, strict=True)),
    )
    run.gold_ids = {pid for pid, r in row_of.items() if r in set(split.gold_rows.tolist())}
    for pid in sorted(run.gold_ids):  # the expert labels the gold set up front, from the viewer (no task)
        voting.cast_vote(project, expert_user, Role.EXPERT, patch_id=pid, label=run.answer(expert, 0, pid))
    return run


def work_queue(run: Run, round_: TrainingRound) -> int:
    """Everyone works the queue until nothing is left for them; returns the votes cast."""
    project = Project.objects.get(pk=run.project.pk)
    people = list(enumerate(run.students, 1)) if run.students else [(0, run.expert)]
    votes = 0
    progressing = True
    while progressing:
        progressing = False
        for index, (user, person) in people:
            task = queue.lease_next_task(project, user, person.role)
            if task is None:
                continue
            if task.kind == AnnotationTask.Kind.EXPERT and person.role != Role.EXPERT:
                queue.release_task(project, user, task.pk)
                continue
            label = run.answer(person, index, task.patch_id)
            voting.cast_vote(project, user, person.role, patch_id=task.patch_id, label=label, task_id=task.pk)
            votes += 1
            progressing = True
    return votes + review_contested(run, project, round_)


def review_contested(run: Run, project: Project, round_: TrainingRound) -> int:
    """The occasional expert vote: the expert settles a share of the open contested patches."""
    if not run.students:
        return 0
    user, expert = run.expert
    open_reviews = AnnotationTask.objects.filter(
        project=project, kind=AnnotationTask.Kind.EXPERT, state=AnnotationTask.State.OPEN
    ).count()
    rng = np.random.default_rng([run.split.seed, round_.number, 31])
    votes = 0
    for _ in range(int(rng.binomial(open_reviews, run.setting.expert_rate))):
        task = queue.lease_next_task(project, user, Role.EXPERT)
        if task is None:
            break
        if task.kind != AnnotationTask.Kind.EXPERT:
            queue.release_task(project, user, task.pk)
            break
        label = run.answer(expert, 0, task.patch_id)
        voting.cast_vote(project, user, Role.EXPERT, patch_id=task.patch_id, label=label, task_id=task.pk)
        votes += 1
    return votes


def count_labels(run: Run) -> int:
    """Final labels the loop paid for (the gold set is validation, not counted)."""
    return (
        Consensus.objects.filter(project=run.project, status__in=FINAL, label__isnull=False)
        .exclude(patch_id__in=run.gold_ids)
        .count()
    )


def train_round(run: Run, batch_size: int, write_scores: bool) -> TrainingRound:
    Project.objects.filter(pk=run.project.pk).update(batch_size=max(1, batch_size))
    # The simulator runs the round itself: no message goes out that a worker on the same broker could race it for.
    round_ = services.start_round(Project.objects.get(pk=run.project.pk), launch=False)
    round_ = pipeline.run_round(round_.pk, write_scores=write_scores)
    if round_.state != TrainingRound.State.SUCCEEDED:
        raise SimulationError(f"Round {round_.number} of {run.project.name!r} {round_.state}: {round_.error}")
    return round_


def simulate_run(run: Run, cfg: Config, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Cold start, then label up to each budget and retrain, through the platform's services.

    A round's row carries ``budget`` = the budget its labels reached first (a noisy crowd can fall a few
    labels short of a budget, e.g. contested patches the expert has not settled; the next round then
    asks for the rest), else an empty budget.
    """
    out: list[dict[str, Any]] = []
    budgets = sorted(cfg.budgets)
    labels = votes = stalled = 0
    reached: set[int] = set()
    while True:
        target = next((b for b in budgets if b > labels), None)
        started = time.monotonic()
        round_ = train_round(run, (target - labels) if target else 1, cfg.write_scores)
        seconds = time.monotonic() - started
        if not round_.metrics.get("cold_start"):
            hit = [b for b in budgets if b <= labels and b not in reached]
            reached.update(hit)
            budget = max(hit) if hit else None
            out.append(round_row(run, round_, budget, votes, seconds, target is None, cfg.extra_heads))
            if progress:
                r = out[-1]
                progress(
                    f"  {run.setting.name} {run.arm} seed {run.split.seed}: {r['labels']} labels, "
                    f"test accuracy {r['test_accuracy']:.3f} (round {seconds:.1f}s)"
                )
        if target is None:
            return out
        votes += work_queue(run, round_)
        now = count_labels(run)
        stalled = stalled + 1 if now <= labels else 0
        if stalled >= 3:
            raise SimulationError(
                f"The queue of {run.project.name!r} gave no new label in 3 rounds; is the pool exhausted?"
            )
        labels = now


def simulate(
    source: SourceSet,
    cfg: Config,
    progress: Progress | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    jobs: list[tuple[Setting, int, str]] | None = None,
) -> list[dict[str, Any]]:
    """Every (setting, seed, arm) of ``cfg``, or ``jobs`` in the order given; the arms of a seed share
    its split, gold set and annotators."""
    if source.embeddings is None:
        source_embeddings(source, progress)
    if jobs is None:
        jobs = [(setting, seed, arm) for setting in cfg.settings for seed in cfg.seeds for arm in cfg.arms]
    splits: dict[int, Split] = {}
    rows: list[dict[str, Any]] = []
    for setting, seed, arm in jobs:
        if seed not in splits:
            splits[seed] = split_rows(source, cfg, seed)
            for warning in splits[seed].warnings:
                if progress:
                    progress(f"WARNING: {warning}")
        split = splits[seed]
        run = start_run(source, split, arm, setting, cfg)
        for row in simulate_run(run, cfg, progress):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
