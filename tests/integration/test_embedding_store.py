"""The round's embedding step over the per-slide store: shared by content, resumable slide by slide."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annotations.models import Patch
from learner import embedding
from learner.conf import learner_settings
from learner.core.errors import Cancelled
from tests.integration.test_rounds import lung_project


def pool_arrays(project: Any) -> tuple[np.ndarray, ...]:
    rows = np.array(
        Patch.objects.filter(project=project).order_by("id").values_list("id", "slide_id", "x", "y", "size")
    )
    return tuple(rows[:, i] for i in range(5))


@pytest.mark.django_db
def test_a_cancelled_embedding_pass_keeps_the_slides_it_finished_and_a_new_pass_does_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = lung_project(per_class=2, labelled_per_class=1)  # 6 one-patch slides
    cfg = replace(learner_settings(), CACHE_DIR=tmp_path / "cache")
    backbone = embedding.platform_backbone(project.backbone, cfg)
    arrays = pool_arrays(project)
    embedded: list[int] = []
    real_embed = embedding.embed

    def counting_embed(backbone: Any, images: Any, **kwargs: Any) -> np.ndarray:
        vectors = real_embed(backbone, images, **kwargs)
        embedded.append(len(images))  # counted once done
        return vectors

    monkeypatch.setattr(embedding, "embed", counting_embed)
    monkeypatch.setattr(embedding, "PIXEL_CHUNK", 2)

    def cancel_after_two_chunks() -> bool:
        return len(embedded) >= 2

    with pytest.raises(Cancelled):
        embedding.pool_embeddings(project.patch_size, *arrays, backbone, cfg, should_stop=cancel_after_two_chunks)
    assert sum(embedded) == 4
    embedded.clear()
    rows = embedding.pool_embeddings(project.patch_size, *arrays, backbone, cfg)
    assert sum(embedded) == 2  # the four finished slides were read back, not embedded again
    # the same vectors as one uninterrupted pass into an empty store
    fresh_cfg = replace(cfg, CACHE_DIR=tmp_path / "fresh")
    fresh = embedding.pool_embeddings(project.patch_size, *arrays, backbone, fresh_cfg)
    everything = np.arange(len(arrays[0]))
    np.testing.assert_allclose(rows.take(everything), fresh.take(everything), atol=1e-5)


@pytest.mark.django_db
def test_a_second_project_on_the_same_slides_reads_the_first_ones_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = lung_project(per_class=1, labelled_per_class=1)
    cfg = replace(learner_settings(), CACHE_DIR=tmp_path / "cache", EMBEDDINGS_IN_MEMORY_MB=0)
    backbone = embedding.platform_backbone(first.backbone, cfg)
    before = embedding.pool_embeddings(first.patch_size, *pool_arrays(first), backbone, cfg)
    second = lung_project(per_class=1, labelled_per_class=1)  # the same images: the same slide checksums

    def no_pixels(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("embedded again")

    monkeypatch.setattr(embedding, "embed", no_pixels)
    after = embedding.pool_embeddings(second.patch_size, *pool_arrays(second), backbone, cfg)
    everything = np.arange(3)
    np.testing.assert_array_equal(after.take(everything), before.take(everything))
