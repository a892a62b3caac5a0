"""manage.py prune_models: old versions lose their weights and scores, never their audit trail."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from learner import scores
from learner.models import ModelVersion, SlideScores, TrainingRound
from tests.factories import PatchFactory, ProjectFactory, SlideFactory


def versions(tmp_path: Path, n: int) -> tuple[list[ModelVersion], list]:  # type: ignore[type-arg]
    """A project with ``n`` model versions, oldest first, each with a weights file and scores of 3 patches."""
    project = ProjectFactory()
    slide = SlideFactory(project=project)
    patches = PatchFactory.create_batch(3, slide=slide)
    made = []
    for number in range(1, n + 1):
        round_ = TrainingRound.objects.create(project=project, number=number, state="succeeded")
        weights = tmp_path / f"round-{number}.pt"
        weights.write_bytes(b"weights")
        version = ModelVersion.objects.create(
            project=project,
            round=round_,
            backbone="b",
            train_mode="head",
            weights_path=str(weights),
            class_names=["a", "b"],
            label_snapshot={str(patches[0].pk): "a"},
            metrics={"accuracy": 0.5 + number / 10},
        )
        proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]], dtype=np.float32)
        scores.write(version, np.array([p.pk for p in patches]), np.array([slide.pk] * 3), proba)
        made.append(version)
    return made, patches


@pytest.mark.django_db(transaction=True)  # the files go after the commit
def test_it_keeps_the_newest_versions_whole_and_only_the_rows_of_the_older_ones(tmp_path: Path) -> None:
    made, patches = versions(tmp_path, 4)
    out = StringIO()
    call_command("prune_models", "--keep", "2", stdout=out)
    assert "Pruned 2 model versions: 2 weights files, 2 score rows" in out.getvalue()
    for version in made[:2]:
        version.refresh_from_db()
        assert version.pruned_at is not None and not Path(version.weights_path).exists()
        assert not SlideScores.objects.filter(model_version=version).exists()
        # the audit trail: which labels trained it, and how it did
        assert version.label_snapshot == {str(patches[0].pk): "a"} and version.metrics["accuracy"] > 0.5
    for version in made[2:]:
        version.refresh_from_db()
        assert version.pruned_at is None and Path(version.weights_path).exists()
        assert SlideScores.objects.filter(model_version=version).count() == 1
    assert ModelVersion.objects.count() == 4
    # the newest version still answers for a patch
    score = scores.for_patch(made[0].project_id, patches[1].slide_id, patches[1].pk)
    assert score is not None and score.model_version == made[3] and score.predicted == 1
    assert score.uncertainty == pytest.approx(1 - (0.6 - 0.4), abs=1e-6)
    # a second run finds nothing left to prune
    again = StringIO()
    call_command("prune_models", "--keep", "2", stdout=again)
    assert "Pruned 0 model versions" in again.getvalue()


@pytest.mark.django_db
def test_a_dry_run_deletes_nothing_and_keep_must_be_at_least_one(tmp_path: Path) -> None:
    made, _ = versions(tmp_path, 2)
    out = StringIO()
    call_command("prune_models", "--keep", "1", "--dry-run", stdout=out)
    assert "Would prune 1 model versions: 1 weights files, 1 score rows" in out.getvalue()
    assert all(Path(v.weights_path).exists() for v in made)
    assert SlideScores.objects.count() == 2 and not ModelVersion.objects.filter(pruned_at__isnull=False).exists()
    with pytest.raises(CommandError, match="--keep must be at least 1"):
        call_command("prune_models", "--keep", "0")
    with pytest.raises(CommandError, match="No project 'nowhere'"):
        call_command("prune_models", "--project", "nowhere")


@pytest.mark.django_db(transaction=True)
def test_pruning_also_deletes_the_cached_exports_built_from_the_pruned_weights(tmp_path: Path) -> None:
    from learner import model_export

    made, _ = versions(tmp_path, 3)
    cached = {}
    for version in made:  # as learner.model_export.build leaves them
        folder = model_export.exports_dir() / str(version.pk) / "wsinfer-1-abc"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "torchscript_model.pt").write_bytes(b"traced")
        cached[version.pk] = folder.parent
    call_command("prune_models", "--keep", "1", stdout=StringIO())
    assert not cached[made[0].pk].exists() and not cached[made[1].pk].exists()
    assert (cached[made[2].pk] / "wsinfer-1-abc" / "torchscript_model.pt").is_file()
