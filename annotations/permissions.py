"""Who may do what in a project. Every view, consumer and file endpoint asks here."""

from __future__ import annotations

from typing import Any

from django.http import Http404

from .models import Membership, Project, Role


def _role_without_membership(user: Any) -> str | None:
    """Staff superusers act as admins in every project, member or not."""
    return Role.ADMIN if getattr(user, "is_superuser", False) else None


def membership_role(user: Any, project_id: int) -> str | None:
    """The user's role in the project, or None."""
    if not getattr(user, "is_authenticated", False):
        return None
    role = Membership.objects.filter(user=user, project_id=project_id).values_list("role", flat=True).first()
    return role if role is not None else _role_without_membership(user)


def project_for(user: Any, project_id: int, *, roles: tuple[str, ...] | None = None) -> tuple[Project, str]:
    """Load a project the user belongs to, or raise 404 (never reveal other projects exist).

    With ``roles``, a member whose role is not listed gets PermissionDenied (403).
    """
    membership = (
        Membership.objects.filter(user=user, project_id=project_id).select_related("project").first()
        if getattr(user, "is_authenticated", False)
        else None
    )
    if membership is not None:
        project, role = membership.project, membership.role
    else:
        role = _role_without_membership(user)  # anonymous users are never superusers
        project = Project.objects.filter(pk=project_id).first() if role is not None else None
        if project is None:
            raise Http404("No such project.")
    check_role(role, roles)
    return project, role


def check_role(role: str, roles: tuple[str, ...] | None) -> None:
    """PermissionDenied (403) unless ``roles`` is None or lists ``role``."""
    from rest_framework.exceptions import PermissionDenied

    if roles is not None and role not in roles:
        raise PermissionDenied(f"Your role in this project ({role}) may not do this.")


def projects_with_roles(user: Any) -> list[tuple[Project, str]]:
    """Every project the user may open, by name, with their role in it (label classes prefetched)."""
    if not getattr(user, "is_authenticated", False):
        return []
    roles = dict(Membership.objects.filter(user=user).values_list("project_id", "role"))
    projects = Project.objects.prefetch_related("label_classes").order_by("name")
    if _role_without_membership(user) is None:
        projects = projects.filter(pk__in=roles)
    return [(p, roles.get(p.pk) or _role_without_membership(user) or "") for p in projects]
