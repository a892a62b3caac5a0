"""The admins' task list: the expert and gold tasks among many crowd tasks come from their own index."""

from __future__ import annotations

import pytest
from django.db import connection

from annotations.models import AnnotationTask, Patch, Role
from tests.factories import ProjectFactory, SlideFactory, api_client, member

Kind = AnnotationTask.Kind

pytestmark = pytest.mark.django_db


def build(n_crowd: int = 4000) -> tuple[object, list[int], list[int]]:
    """A project of ``n_crowd`` open crowd tasks, with 3 expert and 2 gold tasks among the oldest rows."""
    project = ProjectFactory()
    slide = SlideFactory(project=project)
    patches = Patch.objects.bulk_create(
        Patch(project=project, slide=slide, x=(i % 200) * 224, y=(i // 200) * 224, size=224, magnification=20.0)
        for i in range(n_crowd)
    )
    kinds = [Kind.EXPERT] * 3 + [Kind.GOLD] * 2
    reviews = AnnotationTask.objects.bulk_create(
        AnnotationTask(project=project, patch=patch, kind=kind) for patch, kind in zip(patches, kinds, strict=False)
    )
    AnnotationTask.objects.bulk_create(
        AnnotationTask(project=project, patch=patch, kind=Kind.CROWD) for patch in patches
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE annotations_annotationtask")
    expert = [t.pk for t in reviews if t.kind == Kind.EXPERT]
    gold = [t.pk for t in reviews if t.kind == Kind.GOLD]
    return project, expert, gold


def test_the_expert_and_gold_filters_page_newest_first_from_their_index() -> None:
    project, expert, gold = build()
    admin = api_client(member(project, Role.ADMIN))
    url = f"/api/v1/projects/{project.pk}/tasks/"

    sent: list[tuple[str, object]] = []

    def record(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        sent.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        first = admin.get(url, {"kind": "expert", "limit": 2})
    assert first.status_code == 200, first.content
    assert [row["id"] for row in first.json()["results"]] == sorted(expert, reverse=True)[:2]
    rest = admin.get(url, {"kind": "expert", "limit": 2, "before": first.json()["next_before"]}).json()
    assert [row["id"] for row in rest["results"]] == sorted(expert)[:1] and rest["next_before"] is None
    listed_gold = admin.get(url, {"kind": "gold"}).json()["results"]
    assert [row["id"] for row in listed_gold] == sorted(gold, reverse=True)

    # The page's query, as the view sent it, is an index walk of the review tasks: no pass over the crowd's.
    ((sql, params),) = [(sql, params) for sql, params in sent if "annotations_annotationtask" in sql]
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        plan = str(cursor.fetchone()[0])
    assert "task_review_newest" in plan, plan
    assert "Seq Scan" not in plan, plan
