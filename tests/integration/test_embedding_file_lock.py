"""Two processes adding rows to one slide's embedding file at once (two chunks of a large slide finishing
together on two workers) lose none of them: ``put_slide`` merges under the slide's PostgreSQL advisory lock.
Without the lock the same race keeps only some of the rows (9 of 60 when tried)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from learner.core.embedding_store import EmbeddingStore
from tests.integration.conftest import REPO_ROOT
from tests.integration.conftest import test_database_url as database_url

ROWS_EACH = 30
KEY = "slide-1-224-224"
WRITER = """
import sys, time
from pathlib import Path
import django
django.setup()
import numpy as np
from learner.core.embedding_store import EmbeddingStore
from learner.locks import slide_file_lock

root, writer, rows, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
store = EmbeddingStore(root, "model", 4, write_lock=lambda key: slide_file_lock("model", key))
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
for i in range(rows):
    store.put_slide(sys.argv[5], np.array([[writer * 10_000 + i, i]]), np.full((1, 4), writer, np.float32))
"""


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_two_processes_writing_one_slide_file_lose_no_rows(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": database_url()}
    env.pop("TEST_DATABASE_NAME", None)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(w), str(ROWS_EACH), str(go), KEY],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in (1, 2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()  # both start writing at once
        deadline = time.monotonic() + 60
        for proc in procs:
            assert proc.wait(timeout=max(1, deadline - time.monotonic())) == 0
    finally:
        for proc in procs:
            proc.kill()
    store = EmbeddingStore(tmp_path, "model", 4)
    xy = np.load(store.vectors_path(KEY).with_suffix(".xy.npy"))
    vectors = np.load(store.vectors_path(KEY))
    assert len(xy) == 2 * ROWS_EACH and len(np.unique(xy, axis=0)) == 2 * ROWS_EACH
    assert ((vectors[:, 0] == 1) == (xy[:, 0] < 20_000)).all()  # each position kept its own vector
