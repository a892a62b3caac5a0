"""factory_boy factories shared by the integration tests."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from annotations import queue
from annotations.models import LabelClass, Membership, Patch, Project, Role, Slide

DEFAULT_CLASSES = [("adenocarcinoma", "#d62728"), ("benign", "#2ca02c"), ("squamous", "#1f77b4")]


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.org")
    password = factory.PostGenerationMethodCall("set_password", "pw-histoloop-1")


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    name = factory.Sequence(lambda n: f"Project {n}")
    patch_size = 224
    magnification = 20.0
    votes_required = 3

    @factory.post_generation
    def classes(self, create: bool, extracted: list[tuple[str, str]] | None, **kwargs: object) -> None:
        if not create:
            return
        for order, (name, colour) in enumerate(extracted if extracted is not None else DEFAULT_CLASSES):
            LabelClass.objects.create(project=self, name=name, colour=colour, hotkey=str(order + 1), order=order)


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    project = factory.SubFactory(ProjectFactory)
    role = Role.CROWD


class SlideFactory(factory.django.DjangoModelFactory):
    """A slide row without a file: for queue/vote tests that never read pixels."""

    class Meta:
        model = Slide

    project = factory.SubFactory(ProjectFactory)
    name = factory.Sequence(lambda n: f"slide-{n}.svs")
    status = Slide.Status.READY
    width = 4096
    height = 4096
    levels = 5
    mpp = 0.5
    magnification = 20.0
    checksum = factory.Sequence(lambda n: f"{n:064x}")


class PatchFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Patch

    slide = factory.SubFactory(SlideFactory)
    project = factory.SelfAttribute("slide.project")
    x = factory.Sequence(lambda n: (n % 16) * 224)
    y = factory.Sequence(lambda n: (n // 16) * 224)
    size = 224
    magnification = 20.0
    tissue_fraction = 0.9


def api_client(user: object) -> APIClient:
    """A DRF test client authenticated as ``user``."""
    client = APIClient()
    client.force_authenticate(user)
    return client


def member(project: Project, role: str = Role.CROWD, **kwargs: object) -> object:
    """Create a user with a role in the project and return the user."""
    user = UserFactory(**kwargs)
    Membership.objects.create(user=user, project=project, role=role)
    return user


def queue_every_patch(project: Project) -> int:
    """Queue every patch of the project's ready slides in a seeded spread (as ingest does per slide)."""
    rows = Patch.objects.filter(project=project, slide__status="ready").values_list("pk", "slide_id")
    return queue.enqueue_patches(project, queue.seeded_spread(rows, project.seed))


def copy_slide(slide: Slide, project: Project, **overrides: object) -> Slide:
    """A new row over the same files and facts, copied the way learner.simulation.clone_pool copies slides."""
    from learner.simulation.runs import SLIDE_FIELDS

    values = Slide.objects.filter(pk=slide.pk).values(*SLIDE_FIELDS).get()
    return Slide.objects.create(project=project, **{**values, **overrides})
