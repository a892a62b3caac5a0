"""More like this: the index built from the embedding store (neighbours vs exact, rebuilt when the pool or
the embedding model changes) and its endpoints (permissions, the blind rule, hostile input, labelling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annotations import voting
from annotations.models import Consensus, Patch, Role, Vote
from learner import similar
from learner.conf import learner_settings
from learner.core.embedding_store import ArrayRows, EmbeddingStore
from learner.core.similarity import exact_neighbours
from learner.embedding import cache_dir, slide_key
from learner.tasks import build_similar_index
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db
MODEL = "test-embedder-32px"
DIM = 32


@pytest.fixture(autouse=True)
def scratch_media(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.LEARNER = {**settings.LEARNER, "CACHE_DIR": str(tmp_path / "cache")}
    similar._cache.clear()


def store(model: str = MODEL, dim: int = DIM) -> EmbeddingStore:
    return EmbeddingStore(cache_dir(learner_settings()) / "slides", model, dim)


def embed(slide: Any, patches: list[Patch], vectors: np.ndarray, model: str = MODEL) -> None:
    xy = np.array([[p.x, p.y] for p in patches], dtype=np.int64)
    key = slide_key(slide.checksum, slide.pk, 224, slide.project.patch_size)
    store(model, vectors.shape[1]).put_slide(key, xy, vectors)


def clustered(n: int, seed: int, clusters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (clusters, DIM)).astype(np.float32)
    labels = np.arange(n) % clusters
    return (centres[labels] + rng.normal(0, 1, (n, DIM))).astype(np.float32), labels


def project_with_embeddings(n: int = 60, slides: int = 2) -> tuple[Any, list[Patch], np.ndarray, np.ndarray]:
    project = ProjectFactory()
    vectors, labels = clustered(n, seed=1)
    patches: list[Patch] = []
    per = n // slides
    for s in range(slides):
        slide = SlideFactory(project=project)
        mine = PatchFactory.create_batch(per, slide=slide)
        embed(slide, mine, vectors[s * per : (s + 1) * per])
        patches += mine
    return project, patches, vectors, labels


def test_the_index_finds_the_exact_neighbours_on_small_data() -> None:
    project, patches, vectors, _ = project_with_embeddings()
    pointer = similar.build_index(project, MODEL, DIM)
    assert pointer is not None and pointer["n"] == 60
    truth, truth_d = exact_neighbours(ArrayRows(vectors), np.arange(len(patches)), 10)
    ids = np.array([p.pk for p in patches])
    for i, patch in enumerate(patches):
        found = similar.neighbours(project.pk, patch.pk, 10)
        assert patch.pk not in found.patch_ids.tolist()
        # 32-d vectors keep all their dimensions: the index is exact, distances included.
        assert found.patch_ids.tolist() == ids[truth[i]].tolist()
        np.testing.assert_allclose(found.distances, truth_d[i], atol=1e-4)


def test_the_index_is_rebuilt_when_the_pool_or_the_embedding_model_changes() -> None:
    project, patches, _, _ = project_with_embeddings()
    first = similar.build_index(project, MODEL, DIM)
    assert first is not None
    assert similar.build_index(project, MODEL, DIM) == first  # nothing changed: the same index
    # A new slide's patches, embedded: a new index that holds them.
    slide = SlideFactory(project=project)
    new = PatchFactory.create_batch(5, slide=slide)
    embed(slide, new, clustered(5, seed=9)[0])
    with pytest.raises(similar.NotIndexed):
        similar.neighbours(project.pk, new[0].pk, 5)
    second = build_similar_index(project.pk, MODEL, DIM)  # the cpu worker's task, called in-process
    assert second == 65
    pointer = similar.read_pointer(project.pk)
    assert pointer is not None and pointer["fingerprint"] != first["fingerprint"]
    assert len(similar.neighbours(project.pk, new[0].pk, 5).patch_ids) == 5
    # The old index's files are gone; the new one's remain.
    names = {p.name for p in similar.folder(project.pk).iterdir()}
    assert not any(first["name"] in n for n in names)
    # Another embedding model (the project's backbone changed): its own index.
    other = np.random.default_rng(3).normal(size=(65, 16)).astype(np.float32)
    for sl in project.slides.all():
        mine = list(Patch.objects.filter(slide=sl).order_by("id"))
        idx = [i for i, p in enumerate(Patch.objects.filter(project=project).order_by("id")) if p.slide_id == sl.pk]
        embed(sl, mine, other[idx], model="other-model")
    third = similar.build_index(project, "other-model", 16)
    assert third is not None and third["model_id"] == "other-model"
    assert similar.neighbours(project.pk, patches[0].pk, 3).model_id == "other-model"


def test_a_project_without_embeddings_has_no_index() -> None:
    project = ProjectFactory()
    PatchFactory.create_batch(3, slide=SlideFactory(project=project))
    assert similar.build_index(project, MODEL, DIM) is None
    assert build_similar_index(10**9, MODEL, DIM) == 0  # a project deleted since its round


def _url(project: Any, patch: Any, query: str = "") -> str:
    return f"/api/v1/projects/{project.pk}/patches/{patch.pk}/similar/{query}"


def test_experts_see_neighbours_with_their_consensus_and_crowd_members_see_no_labels() -> None:
    project, patches, _, labels = project_with_embeddings()
    similar.build_index(project, MODEL, DIM)
    expert = member(project, Role.EXPERT)
    crowd = member(project, Role.CROWD)
    names = ["adenocarcinoma", "benign", "squamous"]
    target = patches[0]
    first = api_client(expert).get(_url(project, target, "?k=5")).json()["neighbours"]
    # The expert labels every neighbour: they now have a consensus and the expert's vote.
    for row in first:
        cls = labels[[p.pk for p in patches].index(row["id"])]
        voting.cast_vote(project, expert, Role.EXPERT, patch_id=row["id"], label=names[cls])
    body = api_client(expert).get(_url(project, target, "?k=5")).json()
    assert body["patch"] == target.pk and body["indexed"] == 60 and body["embedding_model"] == MODEL
    rows = body["neighbours"]
    assert [r["id"] for r in rows] == [r["id"] for r in first]
    assert all(r["consensus"]["status"] == "expert" and r["my_vote"] == r["consensus"]["label"] for r in rows)
    assert rows == sorted(rows, key=lambda r: r["distance"])
    # Same cluster: the neighbours carry the target's class.
    assert {r["consensus"]["label"] for r in rows} == {names[labels[0]]}
    # The blind rule: the crowd gets ids, distances and pictures only.
    seen = api_client(crowd).get(_url(project, target, "?k=5"))
    assert seen.status_code == 200
    for row in seen.json()["neighbours"]:
        assert set(row) == {"id", "distance", "image_url", "slide"}
        assert row["image_url"] == f"/api/v1/patches/{row['id']}/image.jpeg"
    assert b"consensus" not in seen.content and b"my_vote" not in seen.content


def test_the_similar_endpoint_refuses_outsiders_and_bad_input() -> None:
    project, patches, _, _ = project_with_embeddings()
    expert = api_client(member(project, Role.EXPERT))
    assert expert.get(_url(project, patches[0])).json()["detail"].startswith("No similarity index yet")
    similar.build_index(project, MODEL, DIM)
    assert len(expert.get(_url(project, patches[0])).json()["neighbours"]) == 59  # k defaults to 100
    for bad in ("?k=0", "?k=501", "?k=abc", "?k=-1", "?k=1e3", "?k=%00"):
        response = expert.get(_url(project, patches[0], bad))
        assert response.status_code == 400 and "k" in response.json(), bad
    other = ProjectFactory()
    stranger = PatchFactory(slide=SlideFactory(project=other))
    assert expert.get(_url(project, stranger)).status_code == 404
    assert api_client(member(other, Role.ADMIN)).get(_url(project, patches[0])).status_code == 404
    assert api_client(None).get(_url(project, patches[0])).status_code in (401, 403)


def test_experts_label_neighbours_at_once_and_bad_input_changes_nothing() -> None:
    project, patches, _, _ = project_with_embeddings()
    expert = member(project, Role.EXPERT)
    client = api_client(expert)
    url = _url(project, patches[0]) + "label/"
    chosen = [p.pk for p in patches[1:4]]
    other = PatchFactory(slide=SlideFactory(project=ProjectFactory()))
    for body in (
        {"label": "benign", "patches": [*chosen, other.pk]},  # a patch of another project
        {"label": "no-such-label", "patches": chosen},
        {"label": "benign", "patches": [chosen[0], chosen[0]]},
        {"label": "benign", "patches": []},
        {"label": "benign", "patches": list(range(1, 502))},
        {"label": "benign", "patches": ["x"]},
    ):
        response = client.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert not Vote.objects.filter(project=project).exists()
    response = client.post(url, {"label": "benign", "patches": chosen}, format="json")
    assert response.status_code == 201, response.content
    votes = Vote.objects.filter(project=project)
    assert sorted(votes.values_list("patch_id", flat=True)) == chosen
    assert set(votes.values_list("provenance", flat=True)) == {"similar"}
    assert {c.label.name for c in Consensus.objects.filter(patch_id__in=chosen)} == {"benign"}
    # Again: already voted, skipped and reported, nothing added.
    again = client.post(url, {"label": "benign", "patches": chosen}, format="json").json()
    assert again["skipped"] == chosen and again["votes"] == []
    assert votes.count() == 3
    crowd = api_client(member(project, Role.CROWD))
    refused = crowd.post(url, {"label": "benign", "patches": [patches[5].pk]}, format="json")
    assert refused.status_code == 403
