"""The embedding map: laid out by a round's map stage and by the task on a real Celery worker, served as a
binary payload (decoded here with an independent reader), permission-checked like other project data."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import numpy as np
import pytest

from annotations.consensus import recompute_consensus
from annotations.models import Consensus, LabelClass, Patch, Role, Vote
from learner import embedding, layout, maps, services
from learner.conf import learner_settings
from learner.core.embedding_store import ArrayRows
from learner.models import EmbeddingMap, ModelVersion, TrainingRound
from tests.bench.bench_scale import build_project
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member
from tests.integration.conftest import wait_for
from tests.integration.test_round_at_scale import remove_store_files

DTYPES = {"uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "float32": "<f4", "float64": "<f8"}


def decode(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The payload as learner/maps.py documents it, read without its code."""
    assert body[:4] == b"HLMP"
    version, length = struct.unpack("<II", body[4:12])
    assert version == 1
    header = json.loads(body[12 : 12 + length])
    arrays = {}
    for a in header["arrays"]:
        assert a["offset"] % 8 == 0 and a["offset"] >= 12 + length
        dtype = np.dtype(DTYPES[a["dtype"]])
        arrays[a["name"]] = np.frombuffer(body, dtype=dtype, count=a["count"], offset=a["offset"])
    return header, arrays


def true_classes(project: Any, ids: np.ndarray) -> np.ndarray:
    """The synthetic cluster of each patch, as write_synthetic_embeddings draws it (seed 0)."""
    order = {n: i for i, n in enumerate(project.label_classes.order_by("order").values_list("name", flat=True))}
    final = dict(
        Consensus.objects.filter(project=project, status__in=["agreed", "expert"]).values_list(
            "patch_id", "label__name"
        )
    )
    n = len(order)
    return np.array([order[final[i]] if i in final else (i * 2654435761) % n for i in ids.tolist()])


def separated(xy: np.ndarray, classes: np.ndarray) -> float:
    """Share of points nearer their own class's centroid than any other's."""
    centres = np.stack([xy[classes == c].mean(axis=0) for c in np.unique(classes)])
    nearest = np.argmin(((xy[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    return float((np.unique(classes)[nearest] == classes).mean())


@pytest.mark.django_db(transaction=True)
def test_a_round_lays_out_the_map_and_an_admin_relays_it_on_the_worker(celery_worker_process) -> None:  # type: ignore[no-untyped-def]
    project = build_project(3000, 3, f"map{uuid.uuid4().hex[:8]}")
    cfg = learner_settings()
    backbone = embedding.platform_backbone(project.backbone, cfg)
    embedding.write_synthetic_embeddings(project, backbone, cfg, seed=0, spread=0.3)
    try:
        round_ = services.start_round(project)
        finished = wait_for(
            lambda: TrainingRound.objects.filter(pk=round_.pk, state__in=["succeeded", "failed", "cancelled"]).first(),
            timeout=300,
            interval=0.5,
            message="the round to end",
        )
        assert finished.state == "succeeded", (finished.error, celery_worker_process.log_path.read_text()[-3000:])
        assert "map" in finished.timings
        stored = EmbeddingMap.objects.get(project=project)
        version = ModelVersion.objects.get(round=finished)
        assert stored.model_version == version and stored.n_points == 3000 and stored.method == "pca"

        admin, expert = member(project, Role.ADMIN), member(project, Role.EXPERT)
        response = api_client(expert).get(f"/api/v1/projects/{project.pk}/map/")
        assert response.status_code == 200
        assert response["Content-Type"] == maps.CONTENT_TYPE
        header, arrays = decode(response.content)
        ids = np.array(sorted(Patch.objects.filter(project=project).values_list("pk", flat=True)))
        assert header["count"] == 3000 and np.array_equal(arrays["ids"].astype(np.int64), ids)
        xy = arrays["xy"].reshape(-1, 2)
        assert np.isfinite(xy).all() and np.abs(xy).max() <= 1.0
        assert separated(xy.astype(np.float64), true_classes(project, ids)) > 0.95
        # Every point is scored by the round's model: prediction codes 1..classes, uncertainty 1..10.
        assert header["model_version"] == version.pk
        assert set(np.unique(arrays["prediction"])) <= set(range(1, len(version.class_names) + 1))
        assert arrays["uncertainty"].min() >= 1 and arrays["uncertainty"].max() <= 10
        slide_names = [s["name"] for s in header["slides"]]
        assert len(slide_names) == 3 and set(np.unique(arrays["slide"])) == {0, 1, 2}
        # The consensus channel is the project's consensus now (255: contested).
        labels = {lab["id"]: lab["code"] for lab in header["labels"]}
        rows = list(Consensus.objects.filter(project=project).values_list("patch_id", "label_id", "status"))
        expected = [255 if status == "contested" else labels.get(lid, 0) for _, lid, status in rows]
        assert arrays["consensus"][np.searchsorted(ids, [pid for pid, _, _ in rows])].tolist() == expected
        assert int((arrays["consensus"] > 0).sum()) == sum(1 for code in expected if code)

        # A second round over the same pool keeps the stored map; an admin's "lay it out again" queues
        # the task on the worker, which writes a new one.
        response = api_client(admin).post(f"/api/v1/projects/{project.pk}/map/", {"force": True}, format="json")
        assert response.status_code == 202, response.content
        wait_for(lambda: EmbeddingMap.objects.filter(project=project).count() == 2, timeout=120, message="the new map")
        newest = maps.latest(project)
        assert newest is not None and newest.pool_digest == stored.pool_digest and newest.pk != stored.pk
    finally:
        remove_store_files(project)


@pytest.mark.django_db
def test_the_map_is_for_experts_and_admins_of_the_project_only() -> None:
    project = ProjectFactory()
    PatchFactory.create_batch(20, slide=SlideFactory(project=project))
    other = ProjectFactory()
    ids = np.array(sorted(Patch.objects.filter(project=project).values_list("pk", flat=True)))
    crowd, expert, admin = member(project, Role.CROWD), member(project, Role.EXPERT), member(project, Role.ADMIN)
    outsider = member(other, Role.ADMIN)
    url = f"/api/v1/projects/{project.pk}/map/"
    response = api_client(expert).get(url)
    assert response.status_code == 404 and "no map yet" in response.json()["detail"]
    xy = layout.compute_xy(ArrayRows(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)))
    built = layout.Layout(ids, np.full(20, Patch.objects.first().slide_id), xy, "pca", layout.pool_digest(ids))
    maps.save(project, built, 0.1)
    assert api_client(crowd).get(url).status_code == 403
    assert api_client(outsider).get(url).status_code == 404
    assert api_client(expert).post(url, {}, format="json").status_code == 403
    assert api_client(crowd).post(url, {}, format="json").status_code == 403
    assert api_client(admin).post(url, {"force": "sideways"}, format="json").status_code == 400
    header, arrays = decode(api_client(admin).get(url).content)
    assert header["model_version"] is None and not arrays["prediction"].any() and not arrays["uncertainty"].any()
    # A label cast now shows in the next payload (colours are computed when served).
    label = LabelClass.objects.filter(project=project).order_by("order")[1]
    Vote.objects.create(project=project, patch_id=int(ids[3]), annotator=expert, label=label, role=Role.EXPERT)
    recompute_consensus(project, int(ids[3]))
    _, arrays = decode(api_client(expert).get(url).content)
    assert arrays["consensus"].tolist() == [2 if i == 3 else 0 for i in range(20)]


def test_the_layout_is_fitted_on_a_sample_and_every_row_is_placed_chunk_by_chunk() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 4, (3, 64)).astype(np.float32)
    classes = rng.integers(0, 3, 5000)
    rows = ArrayRows(rng.standard_normal((5000, 64)).astype(np.float32) + centres[classes])
    xy = layout.compute_xy(rows, fit_limit=400)
    assert xy.shape == (5000, 2) and xy.dtype == np.float32 and np.abs(xy).max() <= 1.0
    assert separated(xy.astype(np.float64), classes) > 0.98
    assert np.array_equal(xy, layout.compute_xy(rows, fit_limit=400)), "the same seed gives the same map"
    assert layout.compute_xy(ArrayRows(np.zeros((0, 64), np.float32))).shape == (0, 2)
    with pytest.raises(Exception, match="Unknown map method"):
        layout.compute_xy(rows, method="tsne")
