"""Students who improve, in a real browser: a student in training mode opens "My progress" and sees their own
learning curve; the dashboard lists the students with their certification and draws a student's curve."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from annotations.consensus import recompute_consensus
from annotations.models import Role, Vote

from .conftest import login, screenshot

pytestmark = pytest.mark.e2e


def seed_history(seeded: Any, student: Any, expert: Any, committed: Any, n_answers: int) -> None:
    """An expert labels the first ``n_answers`` patches (the first ten gold); the student answers them all,
    right on every other one."""
    with committed():
        project = seeded.project
        labels = list(project.label_classes.all())
        for i, patch in enumerate(seeded.patches[:n_answers]):
            Vote.objects.create(project=project, patch=patch, annotator=expert, label=labels[i % 3], role=Role.EXPERT)
            answer = labels[i % 3] if i % 2 == 0 else labels[(i + 1) % 3]
            Vote.objects.create(project=project, patch=patch, annotator=student, label=answer, role=Role.CROWD)
            if i < 10:
                patch.is_gold = True
                patch.save(update_fields=["is_gold"])
            recompute_consensus(project, patch)
        from annotations.students import refresh_students

        refresh_students(project)


def test_a_student_in_training_mode_sees_their_own_learning_curve(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(gold_rate=0.0, training_mode=True, certification_threshold=0.8)
    if len(seeded.patches) < 30:
        pytest.skip("the test slide has fewer than 30 patches")
    student = make_member(seeded.project, Role.CROWD, username="e2e-progress-student")
    classmate = make_member(seeded.project, Role.CROWD, username="e2e-progress-classmate")
    expert = make_member(seeded.project, Role.EXPERT)
    seed_history(seeded, student, expert, committed, 30)

    login(page, "e2e-progress-student", next_path=f"/projects/{seeded.project.pk}/annotate/")
    expect(page.locator("#annotator")).to_have_attribute("data-state", "ready")
    page.get_by_text("My progress").click()
    curve = page.locator("#my-progress-curve")
    expect(curve.locator(".uplot")).to_be_visible()
    expect(curve).to_have_attribute("data-blocks", "2")  # 30 answers, blocks of 25
    expect(page.locator("#my-progress-summary")).to_contain_text("5 of 10 right (50%)")
    expect(page.locator("#my-progress-summary")).to_contain_text("Not certified yet")
    screenshot(page, "annotator-my-progress")
    # The page asks for the caller's own curve only; another student's is refused.
    refused = page.request.get(f"/api/v1/projects/{seeded.project.pk}/students/{classmate.pk}/learning-curve/")
    assert refused.status == 403


def test_the_dashboard_lists_students_and_draws_a_students_curve(
    page: Any, make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(gold_rate=0.1, adaptive_gold=True, certification_threshold=0.4)
    if len(seeded.patches) < 30:
        pytest.skip("the test slide has fewer than 30 patches")
    make_member(seeded.project, Role.ADMIN, username="e2e-students-admin")
    student = make_member(seeded.project, Role.CROWD, username="e2e-curve-student")
    expert = make_member(seeded.project, Role.EXPERT)
    seed_history(seeded, student, expert, committed, 30)

    login(page, "e2e-students-admin", next_path=f"/projects/{seeded.project.pk}/dashboard/")
    row = page.locator("#students-table tr[data-student='e2e-curve-student']")
    expect(row).to_have_attribute("data-certified", "true")  # 5 of 10 right, threshold 0.4
    expect(row).to_contain_text("50%")
    expect(page.locator("#student-curve-name")).to_have_text("e2e-curve-student")
    expect(page.locator("#student-curve .uplot")).to_be_visible()
    expect(page.locator("#student-curve")).to_have_attribute("data-blocks", "2")
    expect(page.locator("#certification-threshold")).to_have_value("0.4")
    screenshot(page, "dashboard-students")
