"""Batch consensus over a project's votes (annotations.consensus) through the API."""

from __future__ import annotations

import pytest

from annotations import consensus
from annotations.models import Consensus, Role
from tests.factories import api_client, member

pytestmark = pytest.mark.django_db


def test_batch_consensus_runs_dawid_skene_and_writes_every_patch(labelled) -> None:  # type: ignore[no-untyped-def]
    project, patches, truth, _ = labelled
    admin = api_client(member(project, Role.ADMIN))
    response = admin.post(f"/api/v1/projects/{project.pk}/consensus/recompute/")
    assert response.status_code == 200 and response.json()["recomputed"] == 6
    rows = {c.patch_id: c for c in Consensus.objects.filter(project=project)}
    assert [rows[p.pk].label.name for p in patches] == truth
    assert {c.method for c in rows.values()} == {"dawid_skene"}


def test_batch_consensus_rewrites_only_the_rows_that_changed(labelled) -> None:  # type: ignore[no-untyped-def]
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from annotations.models import Vote

    project, patches, *_ = labelled
    assert consensus.recompute_project_consensus(project) == 6
    with CaptureQueriesContext(connection) as queries:
        assert consensus.recompute_project_consensus(project) == 6
    assert not [q for q in queries.captured_queries if q["sql"].startswith(("UPDATE", "INSERT"))]

    # One patch's votes change: exactly that row is rewritten (a rewritten row gets a new xmin).
    def versions() -> dict[int, str]:
        return dict(
            Consensus.objects.filter(project=project).extra(select={"v": "xmin::text"}).values_list("patch_id", "v")
        )

    before = versions()
    Vote.objects.filter(patch=patches[1], role=Role.CROWD).update(label=project.label_classes.get(name="squamous"))
    with CaptureQueriesContext(connection) as queries:
        consensus.recompute_project_consensus(project)
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 1
    after = versions()
    assert [pid for pid in after if after[pid] != before[pid]] == [patches[1].pk]
    changed = Consensus.objects.get(patch=patches[1])
    assert changed.label is not None


def test_batch_consensus_leaves_rows_whose_probabilities_only_drifted(labelled) -> None:  # type: ignore[no-untyped-def]
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    project, patches, *_ = labelled
    consensus.recompute_project_consensus(project)
    row = Consensus.objects.get(patch=patches[0])
    label = row.label.name

    def stored_drift(delta: float) -> None:
        posterior = {k: v + (delta if k == label else 0.0) for k, v in row.posterior.items()}
        Consensus.objects.filter(pk=row.pk).update(posterior=posterior, confidence=row.confidence + delta)

    # An iterative method's re-estimate moves every posterior in the last decimals: no rewrite for that.
    stored_drift(consensus.PROBABILITY_TOLERANCE / 10)
    with CaptureQueriesContext(connection) as queries:
        consensus.recompute_project_consensus(project)
    assert not [q for q in queries.captured_queries if q["sql"].startswith(("UPDATE", "INSERT"))]
    # A move larger than the tolerance is written back.
    stored_drift(consensus.PROBABILITY_TOLERANCE * 10)
    consensus.recompute_project_consensus(project)
    assert Consensus.objects.get(pk=row.pk).confidence == pytest.approx(row.confidence, abs=1e-9)
