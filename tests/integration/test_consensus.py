"""Batch consensus over a project's votes (annotations.consensus) through the API."""

from __future__ import annotations

import pytest

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
