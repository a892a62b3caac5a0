"""The agreement report (annotations.agreement) through the API."""

from __future__ import annotations

import pytest

from annotations.models import Role, Vote
from tests.factories import api_client, member

pytestmark = pytest.mark.django_db


def test_agreement_report_names_the_unreliable_annotator(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    body = api_client(member(project, Role.EXPERT)).get(f"/api/v1/projects/{project.pk}/agreement/").json()
    kappas = {a["username"]: a["cohen_kappa_vs_experts"] for a in body["annotators"]}
    assert kappas["ann"] == pytest.approx(1.0)
    assert kappas["lazy"] is not None and kappas["lazy"] < 0.5
    assert body["krippendorff_alpha"] is not None and body["krippendorff_alpha"] < 1.0
    assert set(body["per_class"]) == {"adenocarcinoma", "benign", "squamous"}


def test_crowd_members_cannot_read_agreement_or_exports(labelled) -> None:  # type: ignore[no-untyped-def]
    project, *_ = labelled
    crowd = api_client(Vote.objects.filter(project=project, role=Role.CROWD).first().annotator)
    assert crowd.get(f"/api/v1/projects/{project.pk}/agreement/").status_code == 403
    assert crowd.get(f"/api/v1/projects/{project.pk}/export/?format=csv&kind=votes").status_code == 403
