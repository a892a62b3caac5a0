"""The viewer's label overlay: one slide's patch grid as columns, consensus labels where the caller may see them."""

from __future__ import annotations

import pytest

from annotations.models import Consensus, Role, Vote
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member

pytestmark = pytest.mark.django_db


def overlay(user, project, slide):  # type: ignore[no-untyped-def]
    response = api_client(user).get(f"/api/v1/projects/{project.pk}/overlay/?slide={slide.pk}")
    assert response.status_code == 200
    return response.json()


def test_the_overlay_gives_each_patch_of_the_slide_with_the_label_each_role_may_see() -> None:
    project = ProjectFactory()
    slide, other = SlideFactory(project=project), SlideFactory(project=project)
    patches = PatchFactory.create_batch(6, slide=slide)
    PatchFactory.create_batch(2, slide=other)
    patches[5].is_gold = True
    patches[5].save(update_fields=["is_gold"])
    names = list(project.label_classes.order_by("order").values_list("name", flat=True))
    label = {name: project.label_classes.get(name=name) for name in names}
    # patch 0 agreed, 1 by an expert, 2 contested with a leading label, 3 pending with none, 4 none at all, 5 gold
    rows = [
        (0, names[1], Consensus.Status.AGREED),
        (1, names[2], Consensus.Status.EXPERT),
        (2, names[0], Consensus.Status.CONTESTED),
        (3, None, Consensus.Status.PENDING),
        (5, names[0], Consensus.Status.EXPERT),
    ]
    for i, name, status in rows:
        Consensus.objects.create(
            project=project, patch=patches[i], label=label[name] if name else None, status=status, method="majority"
        )
    student = member(project, Role.CROWD)
    for i, active in ((0, True), (2, True), (1, False), (5, True)):  # the vote on patch 1 was undone
        Vote.objects.create(
            project=project,
            patch=patches[i],
            annotator=student,
            label=label[names[0]],
            role=Role.CROWD,
            is_active=active,
        )

    body = overlay(member(project, Role.ADMIN), project, slide)
    statuses = body["statuses"]
    assert body["slide"] == slide.pk and body["count"] == 6 and body["labels"] == names
    assert len(body["colours"]) == len(names) and statuses == list(Consensus.Status.values)
    columns = body["patches"]
    assert columns["id"] == sorted(p.pk for p in patches)
    by_id = {p.pk: p for p in patches}
    assert columns["x"] == [by_id[i].x for i in columns["id"]] and columns["y"] == [by_id[i].y for i in columns["id"]]
    assert columns["size"] == [224] * 6
    assert columns["label"] == [1, 2, 0, None, None, 0]
    assert [statuses[s] if s is not None else None for s in columns["status"]] == [
        "agreed",
        "expert",
        "contested",
        None,
        None,
        "expert",
    ]
    assert columns["is_gold"] == [False] * 5 + [True]

    crowd = overlay(student, project, slide)["patches"]
    assert crowd["id"] == columns["id"]
    assert crowd["label"] == [1, None, 0, None, None, 0]  # only where their active vote is
    assert crowd["is_gold"] == [False] * 6  # a student is never told which patches are gold

    empty = overlay(member(project, Role.EXPERT), project, SlideFactory(project=project))
    assert empty["count"] == 0 and all(v == [] for v in empty["patches"].values())


def test_another_projects_slide_gives_an_empty_overlay_not_its_patches() -> None:
    project, stranger = ProjectFactory(), ProjectFactory()
    theirs = SlideFactory(project=stranger)
    PatchFactory.create_batch(3, slide=theirs)
    body = overlay(member(project, Role.ADMIN), project, theirs)
    assert body["count"] == 0 and body["patches"]["id"] == []


def test_the_columns_come_in_id_order_even_when_the_database_aggregates_them_in_another(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from annotations import api_reports

    project = ProjectFactory()
    slide = SlideFactory(project=project)
    patches = PatchFactory.create_batch(5, slide=slide)
    first = project.label_classes.order_by("order").first()
    Consensus.objects.create(project=project, patch=patches[1], label=first, status="agreed", method="majority")
    admin = member(project, Role.ADMIN)
    expected = overlay(admin, project, slide)
    reversed_sql = api_reports._OVERLAY_SQL.replace("ORDER BY p.id", "ORDER BY p.id DESC")
    assert reversed_sql != api_reports._OVERLAY_SQL
    monkeypatch.setattr(api_reports, "_OVERLAY_SQL", reversed_sql)
    assert overlay(admin, project, slide) == expected
    assert expected["patches"]["label"] == [None, 0, None, None, None]
