"""Who may open which page: login required, non-members get 404, the dashboard is for experts/admins."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from annotations.models import Role

pytestmark = pytest.mark.e2e


def client_for(user: Any, committed: Any) -> Client:
    client = Client()
    if user is not None:
        with committed():
            client.force_login(user)
    return client


def get(client: Client, committed: Any, path: str) -> Any:
    with committed():
        return client.get(path)


def test_pages_require_login(make_project: Any, committed: Any) -> None:
    seeded = make_project(queue=False)
    for path in ["/", f"/projects/{seeded.project.pk}/annotate/", f"/projects/{seeded.project.pk}/dashboard/"]:
        response = get(Client(), committed, path)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")


def test_non_members_get_404_and_the_crowd_gets_no_dashboard(
    make_project: Any, make_member: Any, committed: Any
) -> None:
    seeded = make_project(queue=False)
    other = make_project(queue=False)
    pid = seeded.project.pk
    outsider = make_member(other.project, Role.ADMIN)
    student = make_member(seeded.project, Role.CROWD)
    expert = make_member(seeded.project, Role.EXPERT)
    admin = make_member(seeded.project, Role.ADMIN)

    for path in [f"/projects/{pid}/annotate/", f"/projects/{pid}/viewer/", f"/projects/{pid}/dashboard/"]:
        assert get(client_for(outsider, committed), committed, path).status_code == 404
    assert (
        get(client_for(outsider, committed), committed, f"/projects/{pid}/viewer/{other.slide.pk}/").status_code == 404
    )

    crowd = client_for(student, committed)
    assert get(crowd, committed, f"/projects/{pid}/annotate/").status_code == 200
    assert get(crowd, committed, f"/projects/{pid}/viewer/").status_code == 200
    assert get(crowd, committed, f"/projects/{pid}/dashboard/").status_code == 403

    expert_page = get(client_for(expert, committed), committed, f"/projects/{pid}/dashboard/")
    assert expert_page.status_code == 200
    assert b'id="start-round"' not in expert_page.content
    admin_page = get(client_for(admin, committed), committed, f"/projects/{pid}/dashboard/")
    assert b'id="start-round"' in admin_page.content


def test_the_project_list_shows_each_membership_with_its_role(
    make_project: Any, make_member: Any, committed: Any
) -> None:
    first = make_project(queue=False, name="Lung e2e list A")
    second = make_project(queue=False, name="Lung e2e list B")
    user = make_member(first.project, Role.CROWD)
    with committed():
        from annotations.models import Membership

        Membership.objects.create(user=user, project=second.project, role=Role.EXPERT)
    body = get(client_for(user, committed), committed, "/").content.decode()
    assert "Lung e2e list A" in body and "Lung e2e list B" in body
    assert body.count("/dashboard/") == 1  # only where the user is an expert
