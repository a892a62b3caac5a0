"""Training rounds end to end: a real Celery worker, real Redis, PostgreSQL and websocket progress."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from annotations import voting
from annotations.models import AnnotationTask, Patch, Role
from annotations.routing import websocket_urlpatterns
from learner import pipeline, round_stages, services, similar
from learner.models import ModelVersion, SlideScores, TrainingRound
from tests.factories import ProjectFactory, api_client, member
from tests.integration.conftest import wait_for
from tests.integration.lc25000 import CLASS_NAMES, add_lc25000_slides, manifest_rows


def lung_project(per_class: int = 10, labelled_per_class: int = 8, **kwargs: Any):  # type: ignore[no-untyped-def]
    project = ProjectFactory(
        classes=[(name, c) for name, c in zip(CLASS_NAMES.values(), ["#d62728", "#2ca02c", "#1f77b4"], strict=True)],
        batch_size=6,
        random_fraction=0.34,
        **kwargs,
    )
    rows = manifest_rows(per_class, groups_per_class=8)
    add_lc25000_slides(project, rows)
    expert = member(project, Role.EXPERT)
    seen: dict[str, int] = {}
    for row in rows:
        cls = row["_class"]
        if seen.get(cls, 0) >= labelled_per_class:
            continue
        seen[cls] = seen.get(cls, 0) + 1
        patch = Patch.objects.get(project=project, slide__name=row["path"].split("/")[-1])
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=patch.pk, label=CLASS_NAMES[cls])
    return project


async def collect_events(user: Any, project_id: int, until: Any, timeout: float = 240) -> list[dict]:
    app = URLRouter(websocket_urlpatterns)
    communicator = WebsocketCommunicator(app, f"/ws/projects/{project_id}/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    events = [await communicator.receive_json_from(timeout=5)]
    await sync_to_async(until)(events)  # the caller starts the round once we are listening
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        event = await communicator.receive_json_from(timeout=deadline - loop.time())
        events.append(event)
        if event["type"] == "round.finished":
            break
    await communicator.disconnect()
    return events


@pytest.mark.django_db(transaction=True)
def test_a_round_run_by_a_real_worker_streams_progress_and_queues_the_chosen_patches(celery_worker_process) -> None:  # type: ignore[no-untyped-def]
    project = lung_project()
    shutil.rmtree(similar.folder(project.pk), ignore_errors=True)  # left by an earlier run's project of this id
    admin = member(project, Role.ADMIN)
    started: dict[str, Any] = {}

    def start(events: list[dict]) -> None:
        assert events[0]["type"] == "hello"
        response = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
        assert response.status_code == 201, response.content
        started["round"] = response.json()["id"]
        second = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
        assert second.status_code == 409 and "already" in second.json()["detail"]

    events = asyncio.run(collect_events(admin, project.pk, start))
    round_ = TrainingRound.objects.get(pk=started["round"])
    assert round_.state == "succeeded", (round_.error, celery_worker_process.log_path.read_text()[-3000:])
    stages = [e["stage"] for e in events if e["type"] == "round.progress"]
    for stage in ("snapshot", "embed", "train", "evaluate", "score", "select", "publish"):
        assert stage in stages
    assert events[-1]["type"] == "round.finished" and events[-1]["state"] == "succeeded"
    progress = [e["progress"] for e in events if e["type"] == "round.progress"]
    assert progress == sorted(progress)

    version = ModelVersion.objects.get(round=round_)
    assert len(version.label_snapshot) == 24
    # Scores: one row per slide, holding every patch of the pool.
    score_rows = SlideScores.objects.filter(model_version=version)
    assert score_rows.count() == Patch.objects.filter(project=project).values("slide").distinct().count()
    assert sum(score_rows.values_list("n_patches", flat=True)) == Patch.objects.filter(project=project).count()
    assert round_.metrics["split"] == "group" and round_.metrics["n_val"] > 0
    # Held out by group: metrics are computed on groups the model never saw. (Whether the model beats
    # chance is tested on a larger held-out set in tests/unit/test_learner_*; 5 patches cannot show it.)
    assert round_.metrics["n_val"] >= 3
    assert sum(map(sum, round_.metrics["confusion_matrix"])) == round_.metrics["n_val"]
    assert 0.0 <= round_.metrics["balanced_accuracy"] <= 1.0
    chosen = AnnotationTask.objects.filter(round=round_, kind="crowd")
    assert chosen.count() == 6
    assert {t.arm for t in chosen} == {"margin", "random"}
    labelled = {int(k) for k in version.label_snapshot}
    assert not labelled & set(chosen.values_list("patch_id", flat=True))
    # The learner's batch now leads the queue.
    crowd = api_client(member(project, Role.CROWD))
    task = crowd.post(f"/api/v1/projects/{project.pk}/next-task/").json()
    assert task["id"] in set(chosen.values_list("id", flat=True))

    # After publishing, the cpu worker builds the "more like this" index from the round's embeddings.
    pointer = wait_for(lambda: similar.read_pointer(project.pk), timeout=120, message="the similarity index")
    assert pointer["n"] == Patch.objects.filter(project=project).count()
    # On LC25000 the nearest neighbours of a patch are mostly of its class (real ImageNet embeddings: 44 of
    # 57 labelled neighbours agreed when this was written; chance is a third).
    truth = {int(pid): name for pid, name in version.label_snapshot.items()}
    agree = []
    for pid, name in truth.items():
        rows = api_client(admin).get(f"/api/v1/projects/{project.pk}/patches/{pid}/similar/?k=3").json()["neighbours"]
        labelled = [truth[r["id"]] for r in rows if r["id"] in truth]
        agree += [n == name for n in labelled]
    assert len(agree) >= 20 and sum(agree) / len(agree) >= 0.6, (sum(agree), len(agree))


@pytest.mark.django_db(transaction=True)
def test_a_round_that_cannot_train_fails_with_a_clear_error_on_the_worker(celery_worker_process) -> None:  # type: ignore[no-untyped-def]
    project = ProjectFactory(classes=[("tumour", "#ff0000")])
    admin = member(project, Role.ADMIN)
    response = api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/")
    assert response.status_code == 201
    round_ = wait_for(
        lambda: TrainingRound.objects.filter(pk=response.json()["id"], state__in=["failed", "succeeded"]).first(),
        message="the round to end",
    )
    assert round_.state == "failed"
    assert "at least two label classes" in round_.error
    assert not ModelVersion.objects.filter(project=project).exists()
    # The project is free for a new round.
    assert api_client(admin).post(f"/api/v1/projects/{project.pk}/rounds/").status_code == 201


@pytest.mark.django_db(transaction=True)
def test_cancelling_mid_training_leaves_no_model_version_and_the_queue_unchanged(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    project = lung_project(per_class=4, labelled_per_class=3)
    round_ = TrainingRound.objects.create(project=project, number=1)
    before = list(AnnotationTask.objects.filter(project=project).values_list("id", "priority", "state"))
    folder = pipeline.learner_settings().WEIGHTS_DIR / f"project-{project.pk}"
    files_before = set(folder.glob("*.pt"))  # (another database's project of the same id may have some)

    def cancelled_while(fit):  # type: ignore[no-untyped-def]
        def train_then_get_cancelled(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            services.cancel_round(TrainingRound.objects.get(pk=round_.pk))  # an admin clicks Cancel now
            return fit(*args, **kwargs)

        return train_then_get_cancelled

    # Whichever head the round fits (plain, or self-trained on the pool), Cancel arrives during it.
    monkeypatch.setattr(round_stages, "train_head", cancelled_while(round_stages.train_head))
    monkeypatch.setattr(round_stages, "self_train_head", cancelled_while(round_stages.self_train_head))
    monkeypatch.setattr(
        pipeline.RoundReporter,
        "should_stop",
        lambda self: TrainingRound.objects.filter(pk=self.round.pk, cancel_requested=True).exists(),
    )
    result = pipeline.run_round(round_.pk)
    assert result.state == "cancelled"
    assert not ModelVersion.objects.filter(project=project).exists()
    assert list(AnnotationTask.objects.filter(project=project).values_list("id", "priority", "state")) == before
    assert set(folder.glob("*.pt")) == files_before


@pytest.mark.django_db(transaction=True)
def test_a_round_that_fails_after_writing_its_weights_removes_the_file(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    project = lung_project(per_class=4, labelled_per_class=3)
    round_ = TrainingRound.objects.create(project=project, number=1)
    before = list(AnnotationTask.objects.filter(project=project).values_list("id", "priority", "state"))
    folder = pipeline.learner_settings().WEIGHTS_DIR / f"project-{project.pk}"
    files_before = set(folder.glob("*.pt"))
    written: list[Any] = []

    def broken_publish(*args: Any, **kwargs: Any) -> int:
        written.extend(set(folder.glob("*.pt")) - files_before)  # the model file is on disk by now
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline.queue, "publish_round", broken_publish)
    result = pipeline.run_round(round_.pk)
    assert result.state == "failed"
    assert "failed unexpectedly (RuntimeError: disk on fire)" in result.error
    assert len(written) == 1
    assert set(folder.glob("*.pt")) == files_before
    assert not ModelVersion.objects.filter(project=project).exists()
    assert list(AnnotationTask.objects.filter(project=project).values_list("id", "priority", "state")) == before


@pytest.mark.django_db(transaction=True)
def test_a_round_past_its_soft_time_limit_fails_saying_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from celery.exceptions import SoftTimeLimitExceeded

    project = lung_project(per_class=2, labelled_per_class=1)
    round_ = TrainingRound.objects.create(project=project, number=1)

    def out_of_time(*args: Any, **kwargs: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(pipeline, "embed_pool", out_of_time)
    result = pipeline.run_round(round_.pk)
    assert result.state == "failed" and result.error == "The round hit its time limit."


@pytest.mark.django_db(transaction=True)
def test_a_queued_round_cancels_at_once_and_a_redelivered_message_does_nothing() -> None:
    project = lung_project(per_class=2, labelled_per_class=1)
    round_ = TrainingRound.objects.create(project=project, number=1)
    services.cancel_round(round_)
    assert TrainingRound.objects.get(pk=round_.pk).state == "cancelled"
    assert pipeline.run_round(round_.pk).state == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_a_round_whose_worker_went_silent_is_failed_and_frees_the_project(settings) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from django.utils import timezone

    project = lung_project(per_class=2, labelled_per_class=1)
    dead = TrainingRound.objects.create(
        project=project, number=1, state="running", heartbeat_at=timezone.now() - timedelta(minutes=10)
    )
    # Not sent to the broker: a worker running it would race the test database's flush at teardown.
    fresh = services.start_round(project, launch=False)
    dead.refresh_from_db()
    assert dead.state == "failed" and "stopped responding" in dead.error
    assert fresh.number == 2


@pytest.mark.django_db(transaction=True)
def test_cold_start_picks_a_diverse_first_batch_without_training() -> None:
    project = lung_project(per_class=4, labelled_per_class=0)
    round_ = TrainingRound.objects.create(project=project, number=1)
    result = pipeline.run_round(round_.pk)
    assert result.state == "succeeded" and result.metrics["cold_start"] is True
    assert not ModelVersion.objects.filter(project=project).exists()
    arms = set(AnnotationTask.objects.filter(round=result).values_list("arm", flat=True))
    assert arms == {"cold_start_kmeans", "random"}


def test_it_never_splits_a_group_between_training_and_validation() -> None:
    import numpy as np

    groups = [f"g{i // 3}" for i in range(30)]
    labelled = np.arange(30)
    train, val = round_stages.split_by_group(labelled, groups, 0.2, seed=1)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert 3 <= len(val) <= 9 and len(train) + len(val) == 30


@pytest.mark.django_db(transaction=True)
def test_after_a_round_the_heatmap_prediction_and_grad_cam_describe_the_latest_model() -> None:
    project = lung_project(per_class=4, labelled_per_class=3)
    result = pipeline.run_round(TrainingRound.objects.create(project=project, number=1).pk)
    assert result.state == "succeeded", result.error
    expert = api_client(member(project, Role.EXPERT))
    patch = Patch.objects.filter(project=project).first()
    heat = expert.get(f"/api/v1/projects/{project.pk}/heatmap/?slide={patch.slide_id}&label=benign").json()
    assert heat["label"] == "benign" and heat["count"] == 1 and heat["patches"]["id"] == [patch.pk]
    assert 0 <= heat["patches"]["prob"][0] <= 1 and heat["patches"]["x"] == [patch.x]
    prediction = expert.get(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/prediction/").json()
    assert set(prediction["probs"]) == set(CLASS_NAMES.values())
    assert sum(prediction["probs"].values()) == pytest.approx(1.0, abs=1e-3)
    cam = expert.get(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/gradcam.png?label=squamous")
    assert cam.status_code == 200 and cam["Content-Type"] == "image/png"
    assert cam.content[:8] == b"\x89PNG\r\n\x1a\n" and cam["X-Explained-Class"] == "squamous"
    bad = expert.get(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/gradcam.png?label=melanoma")
    assert bad.status_code == 400
    crowd = api_client(member(project, Role.CROWD))
    assert crowd.get(f"/api/v1/projects/{project.pk}/patches/{patch.pk}/gradcam.png").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_a_round_past_the_head_label_cap_fits_every_head_on_a_class_sample(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings.LEARNER = {**settings.LEARNER, "HEAD_MAX_LABELS": 9}
    project = lung_project(per_class=10, labelled_per_class=8)  # 24 labels, 8 of each class
    fitted: list[tuple[int, list[int]]] = []

    def recorded(fit):  # type: ignore[no-untyped-def]
        def fit_and_record(x, labels, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            fitted.append((len(x), sorted(np.bincount(np.asarray(labels), minlength=3).tolist())))
            return fit(x, labels, *args, **kwargs)

        return fit_and_record

    monkeypatch.setattr(round_stages, "train_head", recorded(round_stages.train_head))
    monkeypatch.setattr(round_stages, "self_train_head", recorded(round_stages.self_train_head))
    result = pipeline.run_round(TrainingRound.objects.create(project=project, number=1).pk)
    assert result.state == "succeeded", result.error
    assert result.metrics["n_labels"] == 24 and result.metrics["n_fit"] == 9 < result.metrics["n_train"]
    # The trained head, its deployment refit on all 24 labels, and the arms' heads: 9 labels at most each,
    # three of every class (the classes weigh the same, so each keeps an equal quota).
    assert len(fitted) >= 2 and all(n <= 9 for n, _ in fitted), fitted
    assert [n for n, _ in fitted[:2]] == [9, 9] and fitted[1][1] == [3, 3, 3], fitted
    assert ModelVersion.objects.filter(round=result).exists()
