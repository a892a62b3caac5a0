"""Headless active-learning simulation: the platform's own loop with simulated annotators.

A labelled image set (class-per-folder, or a CSV manifest with path, label and group columns) is
ingested once into a *source* project (one slide with one patch per image). Every run (arm x seed x
setting) then gets a fresh project whose Slide and Patch rows are bulk copies of the source rows
(same files, same checksums, so the embedding cache is shared), minus the test groups. The loop is
the web platform's: ``lease_next_task`` → ``cast_vote`` (consensus) → ``start_round`` + ``run_round``
(in this process, the worker's code) → the round's published tasks. Only the humans are simulated.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.contrib.auth import get_user_model
from django.db import transaction
from PIL import Image
from sklearn.metrics import f1_score

from annotations import queue, slides, voting
from annotations.models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Role, Slide
from learner import embedding, pipeline, services
from learner.conf import learner_settings
from learner.core.backbone import Backbone
from learner.core.classifier import load_model
from learner.core.evaluation import evaluate
from learner.models import ModelVersion, TrainingRound

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
DEFAULT_ARMS = ("random", "least_confidence", "margin", "entropy", "diverse")
DEFAULT_BUDGETS = (50, 100, 200, 400, 750)
COLOURS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
FINAL = (Consensus.Status.AGREED, Consensus.Status.EXPERT)
Progress = Callable[[str], None]


class SimulationError(Exception):
    """Bad input or a loop that cannot go on; the message says what to fix."""


# --- the labelled image set ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    group: str


def read_items(
    source: Path, *, path_column: str = "path", label_column: str = "label", group_column: str = "group_id"
) -> list[Item]:
    """Items from a CSV manifest (paths relative to it) or from a class-per-folder tree.

    In a folder tree ``CLASS/GROUP/image`` the middle folder is the group (patient, slide, case);
    with images directly under ``CLASS/`` each image is its own group.
    """
    if source.is_file():
        return _items_from_manifest(source, path_column, label_column, group_column)
    if source.is_dir():
        return _items_from_folders(source)
    raise SimulationError(f"{source} is neither a folder of class folders nor a CSV manifest.")


def _items_from_manifest(manifest: Path, path_column: str, label_column: str, group_column: str) -> list[Item]:
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {path_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise SimulationError(
                f"{manifest.name} has no {', '.join(sorted(missing))} column; "
                f"name them with --path-column / --label-column."
            )
        has_group = group_column in (reader.fieldnames or [])
        rows = list(reader)
    items = []
    for row in rows:
        path = Path(row[path_column])
        path = path if path.is_absolute() else manifest.parent / path
        group = row[group_column] if has_group and row[group_column] else f"image:{row[path_column]}"
        items.append(Item(path=path, label=row[label_column], group=group))
    if not has_group:
        logger.warning("%s has no %r column: each image is its own group.", manifest.name, group_column)
    return _checked(items, manifest)


def _items_from_folders(root: Path) -> list[Item]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            relative = path.relative_to(class_dir)
            group = f"{class_dir.name}/{relative.parts[0]}" if len(relative.parts) > 1 else f"image:{path.name}"
            items.append(Item(path=path, label=class_dir.name, group=group))
    return _checked(items, root)


def _checked(items: list[Item], source: Path) -> list[Item]:
    labels = sorted({i.label for i in items})
    if len(labels) < 2:
        raise SimulationError(f"{source} has {len(labels)} class(es); a simulation needs at least two.")
    if len(labels) > 9:
        raise SimulationError(f"{source} has {len(labels)} classes; the platform supports at most 9 (hotkeys 1-9).")
    missing = [i.path for i in items if not i.path.is_file()]
    if missing:
        raise SimulationError(f"{len(missing)} listed images do not exist, e.g. {missing[0]}.")
    return items


# --- the source project: every image ingested once -----------------------------------------------------------------


@dataclass
class SourceSet:
    """The ingested images, one row per distinct image (byte-identical copies are ingested once)."""

    project: Project
    class_names: list[str]
    patch_ids: np.ndarray
    slide_ids: np.ndarray
    labels: np.ndarray  # true class index
    groups: np.ndarray
    embeddings: np.ndarray | None = None
    backbone: Backbone | None = None  # what made ``embeddings`` (the platform's backbone for the project)

    def __len__(self) -> int:
        return len(self.patch_ids)


def source_project(items: list[Item], name: str, progress: Progress | None = None) -> SourceSet:
    """Create (or resume filling) the source project and return its rows with their true labels."""
    class_names = sorted({i.label for i in items})
    project = Project.objects.filter(name=name).first()
    if project is None:
        project = _create_source(name, class_names, items[0].path)
    have = set(LabelClass.objects.filter(project=project).values_list("name", flat=True))
    if have != set(class_names):
        raise SimulationError(
            f"Project {name!r} exists with classes {sorted(have)}, not {class_names}; use another --source-project."
        )
    done = _ingested_paths(project)
    todo = [i for i in items if str(i.path) not in done]
    started = time.monotonic()
    for n, item in enumerate(todo, 1):
        _ingest_item(project, item)
        if progress and (n % 500 == 0 or n == len(todo)):
            rate = n / max(1e-9, time.monotonic() - started)
            progress(f"ingested {n} of {len(todo)} new images ({rate:.1f}/s)")
    return _load_source(project, class_names, items)


def _create_source(name: str, class_names: list[str], first: Path) -> Project:
    with Image.open(first) as img:
        size = min(img.size)
    if not 32 <= size <= 2048:
        raise SimulationError(f"Images must be 32-2048 px patches; {first.name} is {size} px.")
    with transaction.atomic():
        project = Project.objects.create(
            name=name, description="Simulation source: every image ingested once.", patch_size=size
        )
        for order, cls in enumerate(class_names):
            LabelClass.objects.create(
                project=project, name=cls, colour=COLOURS[order], hotkey=str(order + 1), order=order
            )
    return project


def _ingested_paths(project: Project) -> set[str]:
    done: set[str] = set()
    for meta in Slide.objects.filter(project=project).values_list("metadata", flat=True):
        done.add(meta.get("sim_path", ""))
        done.update(meta.get("sim_aliases", []))
    return done


def _ingest_item(project: Project, item: Item) -> None:
    """Add and ingest one image as a slide with exactly one patch: the image is the patch."""
    try:
        slide = slides.add_slide_from_path(project, item.path, group=item.group, launch=False)
    except slides.SlideRejected as exc:
        if exc.code == "duplicate":
            _record_alias(project, item)
            return
        logger.warning("Skipped %s: %s", item.path, exc.message)
        return
    slides.ingest(slide.pk)
    slide.refresh_from_db()
    if slide.status != Slide.Status.READY:
        logger.warning("Skipped %s: %s", item.path, slide.error)
        return
    edge = min(slide.width or 0, slide.height or 0)
    # Tissue detection may find no patch in a pale image, or several in a large one; a labelled
    # patch set means one patch per image, whatever the detector thinks.
    with transaction.atomic():
        Patch.objects.filter(slide=slide).exclude(x=0, y=0, size=edge).delete()
        Patch.objects.get_or_create(
            slide=slide, x=0, y=0, size=edge, magnification=float(project.magnification), defaults={"project": project}
        )
        Slide.objects.filter(pk=slide.pk).update(metadata={**slide.metadata, "sim_path": str(item.path)})


def _record_alias(project: Project, item: Item) -> None:
    """A byte-identical copy: remember its path on the slide that has the same pixels."""
    checksum = slides.file_sha256(item.path)
    existing = slides.existing_copy(project, checksum)
    if existing is not None:
        meta = existing.metadata
        meta["sim_aliases"] = [*meta.get("sim_aliases", []), str(item.path)]
        Slide.objects.filter(pk=existing.pk).update(metadata=meta)


def _load_source(project: Project, class_names: list[str], items: list[Item]) -> SourceSet:
    truth = {str(i.path): i for i in items}
    rows = Patch.objects.filter(project=project, slide__status=Slide.Status.READY).order_by("id")
    patch_ids, slide_ids, labels, groups = [], [], [], []
    for pid, sid, meta in rows.values_list("id", "slide_id", "slide__metadata"):
        item = truth.get(meta.get("sim_path", ""))
        if item is None:
            continue  # an image of an earlier run that is no longer in the list
        patch_ids.append(pid)
        slide_ids.append(sid)
        labels.append(class_names.index(item.label))
        groups.append(item.group)
    if not patch_ids:
        raise SimulationError(f"No image of the list could be ingested into {project.name!r}; see the log.")
    return SourceSet(
        project=project,
        class_names=class_names,
        patch_ids=np.array(patch_ids),
        slide_ids=np.array(slide_ids),
        labels=np.array(labels),
        groups=np.array(groups),
    )


def source_embeddings(source: SourceSet, progress: Progress | None = None) -> np.ndarray:
    """Every source image's embedding through the round's own code path (so the rounds hit the cache)."""
    cfg = learner_settings()
    by_id = Patch.objects.select_related("slide", "project").in_bulk(list(source.patch_ids))
    patches = [by_id[int(pid)] for pid in source.patch_ids]
    source.backbone = embedding.platform_backbone(source.project.backbone, cfg)
    last = [time.monotonic()]

    def report(stage: str, fraction: float) -> None:
        if progress and time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            progress(f"embedding source images: {fraction:.0%}")

    source.embeddings = embedding.embed_patches(patches, source.backbone, cfg, progress=report)
    return source.embeddings


# --- simulated annotators ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotator:
    """A simulated person: ``confusion[t, v]`` is the chance of voting v for a patch of true class t."""

    name: str
    role: str
    confusion: np.ndarray

    def answer(self, truth: int, key: tuple[int, ...]) -> int:
        # Seeded by (run seed, annotator, image): every arm of a seed hears the same answer for the same image.
        rng = np.random.default_rng(key)
        return int(rng.choice(len(self.confusion), p=self.confusion[truth]))


def confusion_matrix(accuracy: np.ndarray) -> np.ndarray:
    """Per-class accuracy on the diagonal, the errors spread evenly over the other classes."""
    k = len(accuracy)
    off = (1.0 - accuracy) / max(1, k - 1)
    matrix = np.repeat(off[:, None], k, axis=1)
    matrix[np.arange(k), np.arange(k)] = accuracy
    return matrix


@dataclass(frozen=True)
class Setting:
    """Who labels: a perfect oracle, or a noisy crowd with votes_required votes and an occasional expert."""

    name: str
    students: int = 0
    student_accuracy: tuple[float, float] = (0.6, 0.85)
    votes_required: int = 1
    expert_accuracy: float = 1.0
    expert_rate: float = 1.0  # share of contested patches the expert reviews
    gold_rate: float = 0.0  # share of a student's leases that are gold checks


ORACLE = Setting("oracle")
NOISY = Setting("noisy", students=3, votes_required=3, gold_rate=0.1)
SETTINGS = {"oracle": ORACLE, "noisy": NOISY}


def annotators(setting: Setting, k: int, seed: int) -> tuple[Annotator, list[Annotator]]:
    rng = np.random.default_rng([seed, 7919])
    expert = Annotator("expert", Role.EXPERT, confusion_matrix(np.full(k, setting.expert_accuracy)))
    low, high = setting.student_accuracy
    students = [
        Annotator(f"student{i + 1}", Role.CROWD, confusion_matrix(rng.uniform(low, high, size=k)))
        for i in range(setting.students)
    ]
    return expert, students


# --- one run: a pool project, its people, its rounds ---------------------------------------------------------------


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
    run_tag: str = ""


@dataclass
class Split:
    seed: int
    test_rows: np.ndarray
    pool_rows: np.ndarray  # the pool project's non-gold patches
    gold_rows: np.ndarray


def split_rows(source: SourceSet, cfg: Config, seed: int) -> Split:
    """Test groups, then gold groups, drawn by group (never by image); the rest is the pool."""
    rng = np.random.default_rng([seed, 104729])
    groups = np.unique(source.groups)
    rng.shuffle(groups)
    n_test = max(1, round(cfg.test_fraction * len(groups)))
    n_gold = -(-cfg.gold_size // cfg.gold_per_group) if cfg.gold_size else 0
    if n_test + n_gold >= len(groups):
        raise SimulationError(f"{len(groups)} groups are too few for a test set and {n_gold} gold groups.")
    test = np.isin(source.groups, groups[:n_test])
    gold_group = np.isin(source.groups, groups[n_test : n_test + n_gold])
    gold_rows: list[int] = []
    for group in groups[n_test : n_test + n_gold]:
        members = np.flatnonzero(source.groups == group)
        gold_rows.extend(rng.choice(members, size=min(cfg.gold_per_group, len(members)), replace=False))
    return Split(
        seed=seed,
        test_rows=np.flatnonzero(test),
        pool_rows=np.flatnonzero(~test & ~gold_group),
        gold_rows=np.array(sorted(gold_rows)[: cfg.gold_size], dtype=np.int64),
    )


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


def simulation_users(tag: str, setting: Setting) -> tuple[Any, list[Any]]:
    user_model = get_user_model()

    def user(name: str) -> Any:
        found, _ = user_model.objects.get_or_create(username=f"sim-{tag}-{name}"[:150])
        return found

    return user("expert"), [user(f"student{i + 1}") for i in range(setting.students)]


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

    def answer(self, person: Annotator, index: int, patch_id: int) -> str:
        row = self.row_of[patch_id]
        return self.source.class_names[person.answer(self.truth[patch_id], (self.split.seed, index, row))]


def start_run(source: SourceSet, split: Split, arm: str, setting: Setting, cfg: Config) -> Run:
    rows = np.concatenate([split.pool_rows, split.gold_rows])
    name = f"sim {cfg.run_tag} {setting.name} {arm} seed {split.seed}"
    project, row_of = clone_pool(
        source,
        rows,
        set(split.gold_rows.tolist()),
        name,
        query_strategy=arm,
        random_fraction=1.0 if arm == "random" else cfg.random_fraction,
        votes_required=setting.votes_required,
        gold_rate=setting.gold_rate,
        seed=split.seed,
        description="Simulated run (learner.simulation).",
    )
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


# --- measuring a round on the held-out test groups -----------------------------------------------------------------


def test_metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    m = evaluate(y, proba, class_names)
    return {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": float(f1_score(y, proba.argmax(1), average="macro", labels=range(len(class_names)))),
        "auc": m["roc_auc_ovr"],
    }


def supervised_only(run: Run, rows: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a plain head on the same labels, without the platform's self-training on the
    unlabelled pool (analysis: what self-training adds)."""
    from learner.core.config import TrainConfig
    from learner.core.training import train_head

    emb, backbone = run.source.embeddings, run.source.backbone
    assert emb is not None and backbone is not None
    head = train_head(emb[rows], y, run.source.class_names, backbone, TrainConfig(seed=run.split.seed))
    test = run.split.test_rows
    proba = head.predict_proba(emb[test])
    return test_metrics(run.source.labels[test], proba, run.source.class_names)["accuracy"]  # type: ignore[return-value]


def round_row(
    run: Run, round_: TrainingRound, budget: int | None, votes: int, seconds: float, final: bool, heads: bool
) -> dict[str, Any]:
    """One CSV row: the round's ModelVersion (loaded from its weights file) on the test images."""
    version = ModelVersion.objects.get(round=round_)
    names = version.class_names
    snapshot = {int(pid): names.index(label) for pid, label in version.label_snapshot.items()}
    trained = sorted(pid for pid in snapshot if pid not in run.gold_ids)
    rows = np.array([run.row_of[pid] for pid in trained], dtype=np.int64)
    y = np.array([snapshot[pid] for pid in trained], dtype=np.int64)
    emb = run.source.embeddings
    assert emb is not None
    test = run.split.test_rows
    proba = load_model(version.weights_path).predict_proba(emb[test])
    row: dict[str, Any] = {
        "setting": run.setting.name,
        "arm": run.arm,
        "seed": run.split.seed,
        "round": round_.number,
        "budget": budget,
        "labels": len(trained),
        "votes": votes,
        **{f"test_{k}": v for k, v in test_metrics(run.source.labels[test], proba, names).items()},
        "consensus_accuracy": float((y == run.source.labels[rows]).mean()) if len(rows) else None,
        # Distinct groups among the labels: uncertainty sampling can spend a batch on near-copies.
        "label_groups": len(set(run.source.groups[rows].tolist())),
        "val_accuracy": round_.metrics.get("accuracy"),
        "val_split": round_.metrics.get("split"),
        "round_seconds": round(seconds, 2),
        "project": run.project.pk,
        "round_id": round_.pk,
    }
    if heads and final:  # the final round only
        row["acc_supervised_only"] = supervised_only(run, rows, y)
    return row


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
        split = splits.setdefault(seed, split_rows(source, cfg, seed))
        run = start_run(source, split, arm, setting, cfg)
        for row in simulate_run(run, cfg, progress):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
