"""Server-rendered pages. Each view checks membership and hands the page its ids; the ES modules
under static/frontend/ do the rest through the REST API and the project websocket."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from annotations.models import Project, Role, Slide
from annotations.permissions import project_for, projects_with_roles

EXPERTS = (Role.ADMIN, Role.EXPERT)


def _member_project(request: HttpRequest, project_id: int, roles: tuple[str, ...] | None = None) -> tuple[Project, str]:
    """The project for a member (404 for anyone else); 403 for a member whose role is not in ``roles``."""
    project, role = project_for(request.user, project_id)
    if roles is not None and role not in roles:
        raise PermissionDenied(f"Your role in this project ({role}) cannot open this page.")
    return project, role


def _page_config(project: Project, role: str, **extra: Any) -> dict[str, Any]:
    labels = [
        {"id": label.pk, "name": label.name, "colour": label.colour, "hotkey": label.hotkey}
        for label in project.label_classes.all()
    ]
    return {
        "project": {
            "id": project.pk,
            "name": project.name,
            "training_mode": project.training_mode,
            "patch_size": project.patch_size,
        },
        "role": role,
        "labels": labels,
        "api": f"/api/v1/projects/{project.pk}/",
        "ws": f"/ws/projects/{project.pk}/",
        **extra,
    }


@login_required
def home(request: HttpRequest) -> HttpResponse:
    rows = [
        {"project": project, "role": role, "is_expert": role in EXPERTS}
        for project, role in projects_with_roles(request.user)
    ]
    return render(request, "frontend/home.html", {"rows": rows})


@login_required
def annotate(request: HttpRequest, project_id: int) -> HttpResponse:
    project, role = _member_project(request, project_id)
    from learner.suggestions import strip_allowed

    # A student's own learning curve, in training mode only (annotations.api_reports.MyProgressView says why).
    my_progress = role == Role.CROWD and project.training_mode
    config = _page_config(project, role, can_label_many=role in EXPERTS, my_progress=my_progress)
    context = {
        "project": project,
        "role": role,
        "config": config,
        "page": "annotate",
        "can_strip": strip_allowed(project, role),
    }
    return render(request, "frontend/annotate.html", context)


@login_required
def viewer(request: HttpRequest, project_id: int, slide_id: int | None = None) -> HttpResponse:
    project, role = _member_project(request, project_id)
    slides = list(project.slides.filter(status=Slide.Status.READY).order_by("id"))
    if slide_id is None:
        if not slides:
            context = {"project": project, "role": role, "page": "viewer"}
            return render(request, "frontend/viewer_empty.html", context)
        slide = slides[0]
    else:
        slide = next((s for s in slides if s.pk == slide_id), None)
        if slide is None:
            raise Http404("No such slide in this project, or it is not ready yet.")
    config = _page_config(
        project,
        role,
        slide={"id": slide.pk, "name": slide.name, "mpp": slide.mpp, "width": slide.width, "height": slide.height},
        tilesource=reverse("slide-tilesource", kwargs={"slide_id": slide.pk}),
        osd_images="/static/vendor/openseadragon-images/",
    )
    context = {"project": project, "role": role, "slide": slide, "slides": slides, "config": config, "page": "viewer"}
    return render(request, "frontend/viewer.html", context)


@login_required
def embedding_map(request: HttpRequest, project_id: int) -> HttpResponse:
    """The embedding map (static/frontend/map.js): experts and admins only, as its colours show consensus and
    the model's predictions, and its lasso labels in bulk."""
    from annotations.bulk_voting import MAX_BULK_PATCHES

    project, role = _member_project(request, project_id, roles=EXPERTS)
    config = _page_config(project, role, is_admin=role == Role.ADMIN, max_bulk=MAX_BULK_PATCHES)
    context = {"project": project, "role": role, "config": config, "page": "map"}
    return render(request, "frontend/map.html", context)


@login_required
def strip(request: HttpRequest, project_id: int) -> HttpResponse:
    """The accept-the-model strip, for whoever the project's ``suggestion_strip`` setting lets in."""
    from learner.suggestions import strip_allowed

    project, role = _member_project(request, project_id)
    if not strip_allowed(project, role):
        raise PermissionDenied("This project does not let your role accept the model's suggestions.")
    config = _page_config(project, role)
    context = {"project": project, "role": role, "config": config, "page": "strip", "can_strip": True}
    return render(request, "frontend/strip.html", context)


@login_required
def dashboard(request: HttpRequest, project_id: int) -> HttpResponse:
    project, role = _member_project(request, project_id, roles=EXPERTS)
    upload_url = reverse("slide-upload-page", kwargs={"project_id": project.pk}) if role == Role.ADMIN else None
    config = _page_config(project, role, is_admin=role == Role.ADMIN)
    context = {"project": project, "role": role, "config": config, "upload_url": upload_url, "page": "dashboard"}
    return render(request, "frontend/dashboard.html", context)
