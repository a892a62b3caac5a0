"""Two processes adding rows to one slide's embedding file at once (two chunks of a large slide finishing
together on two workers) lose none of them: ``put_slide`` merges under the slide's PostgreSQL advisory lock."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from django.db import connections

from learner import embedding
from learner.core.embedding_store import EmbeddingStore

ROWS_EACH = 30


def store_at(root: Path, locked: bool) -> EmbeddingStore:
    if locked:
        return EmbeddingStore(root, "model", 4, write_lock=lambda key: embedding.slide_file_lock("model", key))
    return EmbeddingStore(root, "model", 4)


def add_rows(root: Path, writer: int, locked: bool) -> None:
    store = store_at(root, locked)
    for i in range(ROWS_EACH):
        store.put_slide("slide-1-224-224", np.array([[writer * 10_000 + i, i]]), np.full((1, 4), writer, np.float32))
    connections.close_all()


def race(root: Path, locked: bool) -> np.ndarray:
    connections.close_all()  # each child opens its own database session
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=add_rows, args=(root, w, locked)) for w in (1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return np.load(store_at(root, locked).vectors_path("slide-1-224-224").with_suffix(".xy.npy"))


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_two_processes_writing_one_slide_file_lose_no_rows(tmp_path: Path) -> None:
    xy = race(tmp_path / "locked", locked=True)
    assert len(xy) == 2 * ROWS_EACH and len(np.unique(xy, axis=0)) == 2 * ROWS_EACH
    vectors = np.load(store_at(tmp_path / "locked", True).vectors_path("slide-1-224-224"))
    assert ((vectors[:, 0] == 1) == (xy[:, 0] < 20_000)).all()  # each position kept its own vector
