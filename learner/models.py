"""The machine side of the loop: training rounds, model versions and pool scores.

A model version's scores are stored per slide (``SlideScores``: one row per slide holding the patch ids and
their class probabilities as packed arrays), not a row per patch: a round over a million patches writes as
many score rows as the project has slides. ``manage.py prune_models`` deletes old versions' weights files
and scores and keeps their ModelVersion rows (which labels trained which model, with its metrics).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class TrainingRound(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)

    project = models.ForeignKey("annotations.Project", related_name="rounds", on_delete=models.CASCADE)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    number = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    stage = models.CharField(max_length=64, blank=True)
    progress = models.FloatField(default=0.0)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    strategy = models.CharField(max_length=32, blank=True)
    train_mode = models.CharField(max_length=16, blank=True)
    n_labels = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life from the worker.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["project", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["project"], condition=Q(state__in=["queued", "running"]), name="round_one_active_per_project"
            ),
            models.UniqueConstraint(fields=["project", "number"], name="round_unique_number"),
        ]

    def __str__(self) -> str:
        return f"round {self.number} of {self.project}"


class ModelVersion(models.Model):
    project = models.ForeignKey("annotations.Project", related_name="model_versions", on_delete=models.CASCADE)
    round = models.OneToOneField(TrainingRound, related_name="model_version", on_delete=models.CASCADE)
    backbone = models.CharField(max_length=100)
    train_mode = models.CharField(max_length=16)
    weights_path = models.CharField(max_length=500)
    class_names = models.JSONField(default=list)
    strategy = models.CharField(max_length=32, blank=True)
    label_snapshot = models.JSONField(default=dict, help_text="patch id -> label name used for training.")
    metrics = models.JSONField(default=dict)
    n_labels = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    pruned_at = models.DateTimeField(
        null=True, blank=True, help_text="When prune_models deleted this version's weights file and scores."
    )

    class Meta:
        ordering = ["project", "-created_at"]

    def __str__(self) -> str:
        return f"model of round {self.round_id} ({self.backbone}, {self.train_mode})"


class SlideScores(models.Model):
    """One model version's class probabilities for the patches of one slide, as two packed arrays
    (``learner.scores`` packs and reads them): ascending patch ids, and float32 probabilities in the model
    version's class order, one row of classes per patch."""

    model_version = models.ForeignKey(ModelVersion, related_name="slide_scores", on_delete=models.CASCADE)
    slide = models.ForeignKey("annotations.Slide", related_name="model_scores", on_delete=models.CASCADE)
    n_patches = models.PositiveIntegerField()
    patch_ids = models.BinaryField(help_text="zlib-compressed little-endian int64, ascending.")
    probs = models.BinaryField(help_text="zlib-compressed little-endian float32, patches x classes, row-major.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model_version", "slide"], name="slide_scores_unique")]

    def __str__(self) -> str:
        return f"scores of slide {self.slide_id} by model {self.model_version_id}"


class EmbeddingMap(models.Model):
    """A 2-D layout of a project's pool (``learner.layout``), as packed arrays: ascending patch ids, each
    patch's slide, and float32 (x, y) in [-1, 1]. One row per layout, never a row per patch; the newest
    row of a project is the one served. ``pool_digest`` names the pool it was computed for, so a round
    over an unchanged pool reuses it."""

    project = models.ForeignKey("annotations.Project", related_name="embedding_maps", on_delete=models.CASCADE)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, related_name="embedding_maps", on_delete=models.SET_NULL
    )
    method = models.CharField(max_length=16)
    n_points = models.PositiveIntegerField()
    pool_digest = models.CharField(max_length=64)
    patch_ids = models.BinaryField(help_text="zlib-compressed little-endian int64, ascending.")
    slide_ids = models.BinaryField(help_text="zlib-compressed little-endian int64, one per patch.")
    xy = models.BinaryField(help_text="zlib-compressed little-endian float32, patches x 2, row-major, in [-1, 1].")
    seconds = models.FloatField(default=0.0, help_text="How long the layout took to compute.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "-created_at"]
        indexes = [models.Index(fields=["project", "-created_at"], name="embedding_map_latest")]

    def __str__(self) -> str:
        return f"{self.method} map of project {self.project_id} ({self.n_points} points)"
