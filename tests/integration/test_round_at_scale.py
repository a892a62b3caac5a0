"""A round at a larger size, run by a real Celery worker, while an annotator works the queue: the smoke
version of tests/bench/bench_scale.py (which times it at 100k and 1M patches)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from annotations.models import AnnotationTask, Slide
from learner import embedding, services
from learner.conf import learner_settings
from learner.models import ModelVersion, SlideScores, TrainingRound
from tests.bench.bench_scale import Annotators, build_project
from tests.integration.conftest import wait_for

N_PATCHES = 20_000
N_SLIDES = 20


def remove_store_files(project: Any) -> None:
    """The synthetic embeddings this test wrote (their slide keys are unique to the test run)."""
    cfg = learner_settings()
    store = embedding.store_for(embedding.platform_backbone(project.backbone, cfg), project.patch_size, cfg)
    for sid, checksum in Slide.objects.filter(project=project).values_list("pk", "checksum"):
        key = embedding.slide_key(checksum, sid, 224, project.patch_size)
        vectors = store.vectors_path(key)
        vectors.unlink(missing_ok=True)
        vectors.with_suffix(".xy.npy").unlink(missing_ok=True)


@pytest.mark.django_db(transaction=True)
def test_a_round_over_twenty_thousand_patches_never_leaves_an_annotator_without_work(celery_worker_process) -> None:  # type: ignore[no-untyped-def]
    project = build_project(N_PATCHES, N_SLIDES, f"smoke{uuid.uuid4().hex[:8]}")
    cfg = learner_settings()
    written = embedding.write_synthetic_embeddings(
        project, embedding.platform_backbone(project.backbone, cfg), cfg, seed=0
    )
    assert written == N_PATCHES
    crowd = Annotators(project, 1)
    crowd.start()
    try:
        time.sleep(1)
        crowd.phase = "during"
        started = time.perf_counter()
        round_ = services.start_round(project)
        finished = wait_for(
            lambda: TrainingRound.objects.filter(pk=round_.pk, state__in=["succeeded", "failed", "cancelled"]).first(),
            timeout=240,
            interval=0.5,
            message="the round to end",
        )
        seconds = time.perf_counter() - started
        crowd.phase = "after"
        time.sleep(0.5)
    finally:
        crowd.stop()
        remove_store_files(project)
    assert finished.state == "succeeded", (finished.error, celery_worker_process.log_path.read_text()[-3000:])
    assert not crowd.errors
    assert len(crowd.lease["during"]) > 0, "the annotator leased nothing while the round ran"
    assert crowd.empty["during"] == 0, f"{crowd.empty['during']} empty leases while open tasks existed"
    # What the round wrote: its batch on the crowd queue and no expert review (contested patches get theirs
    # when they become contested), one score row per slide covering the whole pool.
    version = ModelVersion.objects.get(round=finished)
    assert AnnotationTask.objects.filter(round=finished, kind="crowd").count() == project.batch_size
    assert not AnnotationTask.objects.filter(round=finished).exclude(kind="crowd").exists()
    rows = SlideScores.objects.filter(model_version=version)
    assert rows.count() == N_SLIDES and sum(rows.values_list("n_patches", flat=True)) == N_PATCHES
    assert 0 < finished.metrics["n_labels"] < N_PATCHES * 0.02
    print(f"round over {N_PATCHES:,} patches in {seconds:.1f} s; leases during it: {len(crowd.lease['during'])}")
