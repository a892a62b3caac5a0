"""The people side of the loop: projects, members, slides, patches, the queue, votes, consensus."""

from __future__ import annotations

import unicodedata
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q


def no_control_characters(value: str) -> None:
    """Names are shown in pages, exports and file names: no tabs, newlines or other control characters."""
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValidationError("Use printable characters only (no tabs, line breaks or control characters).")
    if value != value.strip():
        raise ValidationError("Remove the spaces at the start or end.")


# Upper bounds a real project stays far below; they keep a typo from locking the queue for years.
MAX_LEASE_MINUTES = 24 * 60
MAX_VOTES_REQUIRED = 20
MAX_BATCH_SIZE = 50_000
MAX_DESCRIPTION_LENGTH = 10_000
MAX_VOTE_COST = 10_000.0


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    EXPERT = "expert", "Expert (pathologist)"
    CROWD = "crowd", "Crowd (student)"


class ConsensusMethod(models.TextChoices):
    MAJORITY = "majority", "Majority vote"
    WEIGHTED = "weighted", "Role-weighted vote"
    EXPERT_OVERRIDE = "expert_override", "Expert override"
    DAWID_SKENE = "dawid_skene", "Dawid-Skene"
    GLAD = "glad", "GLAD"


class QueryStrategy(models.TextChoices):
    LEAST_CONFIDENCE = "least_confidence", "Least confidence"
    MARGIN = "margin", "Margin"
    ENTROPY = "entropy", "Entropy"
    DIVERSE = "diverse", "Cluster-then-uncertainty (diversity-aware batch)"
    RANDOM = "random", "Random"


class TrainMode(models.TextChoices):
    HEAD = "head", "Head only on cached embeddings (CPU, seconds)"
    FINETUNE = "finetune", "Fine-tune backbone (GPU)"


class TrainingLabels(models.TextChoices):
    """What a round trains on from each final consensus label (learner.core.training)."""

    HARD = "hard", "The consensus label, as if certain"
    SOFT = "soft", "Soft targets: the consensus posterior (cross-entropy against it)"
    WEIGHTED = "weighted", "The consensus label weighted by its posterior probability"


class ExpertRouting(models.TextChoices):
    """How a round's batch is split between the crowd and the experts (annotations.expert_routing)."""

    CONTESTED = "contested", "Crowd first; patches the crowd contests go to experts"
    VALUE = "value", "By expected value per cost: experts directly where the crowd would be a waste"


class SuggestionAccess(models.TextChoices):
    """Who may open the "accept the model" strip (it shows the model's answer before one's own vote)."""

    OFF = "off", "Nobody"
    EXPERTS = "experts", "Experts and admins"
    CROWD = "crowd", "Crowd members (and admins)"
    BOTH = "both", "Experts, admins and crowd members"


class Project(models.Model):
    name = models.CharField(max_length=200, unique=True, validators=[no_control_characters])
    description = models.TextField(blank=True, max_length=MAX_DESCRIPTION_LENGTH)
    patch_size = models.PositiveIntegerField(
        default=224, validators=[MinValueValidator(32), MaxValueValidator(2048)], help_text="Patch edge in pixels."
    )
    magnification = models.FloatField(
        default=20.0, validators=[MinValueValidator(0.5), MaxValueValidator(80)], help_text="Objective power."
    )
    votes_required = models.PositiveSmallIntegerField(
        default=3, validators=[MinValueValidator(1), MaxValueValidator(MAX_VOTES_REQUIRED)]
    )
    consensus_method = models.CharField(
        max_length=32, choices=ConsensusMethod.choices, default=ConsensusMethod.DAWID_SKENE
    )
    expert_weight = models.FloatField(default=3.0, validators=[MinValueValidator(1.0), MaxValueValidator(100.0)])
    contested_threshold = models.FloatField(
        default=0.34,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share of crowd votes disagreeing with the majority above which a patch goes to experts.",
    )
    gold_rate = models.FloatField(default=0.1, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    training_mode = models.BooleanField(default=False, help_text="Show the expert answer after a gold vote.")
    lease_minutes = models.PositiveIntegerField(
        default=10, validators=[MinValueValidator(1), MaxValueValidator(MAX_LEASE_MINUTES)]
    )
    query_strategy = models.CharField(max_length=32, choices=QueryStrategy.choices, default=QueryStrategy.MARGIN)
    batch_size = models.PositiveIntegerField(
        default=100, validators=[MinValueValidator(1), MaxValueValidator(MAX_BATCH_SIZE)]
    )
    random_fraction = models.FloatField(default=0.1, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    backbone = models.CharField(
        max_length=100,
        default="tf_efficientnet_lite0",
        validators=[no_control_characters],
        help_text="A timm model name (a CNN or a ViT) or a Hugging Face hub id, hf-hub:ORGANISATION/MODEL.",
    )
    backbone_weights = models.CharField(
        max_length=500,
        blank=True,
        validators=[no_control_characters],
        help_text="The backbone's weights file or folder, relative to LEARNER_PRETRAINED_DIR on the workers; "
        "empty for the platform's LEARNER_PRETRAINED.",
    )
    train_mode = models.CharField(max_length=16, choices=TrainMode.choices, default=TrainMode.HEAD)
    training_labels = models.CharField(
        max_length=16,
        choices=TrainingLabels.choices,
        default=TrainingLabels.HARD,
        help_text="Train on the consensus labels (hard) or on their posteriors (soft targets, or weights).",
    )
    seed = models.IntegerField(default=0)
    suggestion_strip = models.CharField(
        max_length=16,
        choices=SuggestionAccess.choices,
        default=SuggestionAccess.EXPERTS,
        help_text="Who may accept the model's suggestions in a strip; off for the crowd by default, as seeing "
        "the model's answer first anchors a student's vote.",
    )
    suggestion_weight = models.FloatField(
        default=1.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="How much a vote that accepted the model's suggestion counts in consensus, from 1 (as much as "
        "any vote) to 0 (not at all: such votes are left out). Changing it recomputes the project's consensus.",
    )
    # What a vote costs, relative to each other (a pathologist's minute against a student's): the dashboard's
    # spent-so-far and the simulation's accuracy-against-cost curves count votes in these units.
    expert_cost = models.FloatField(
        default=10.0,
        validators=[MinValueValidator(0.001), MaxValueValidator(MAX_VOTE_COST)],
        help_text="Relative cost of one expert (or admin) vote, e.g. 10 against a crowd vote's 1.",
    )
    crowd_cost = models.FloatField(
        default=1.0,
        validators=[MinValueValidator(0.001), MaxValueValidator(MAX_VOTE_COST)],
        help_text="Relative cost of one crowd vote.",
    )
    adaptive_redundancy = models.BooleanField(
        default=False,
        help_text="Stop asking the crowd about a patch once its consensus is confident (at least two crowd votes, "
        "consensus confidence at or above redundancy_confidence); votes_required is then the most a patch is asked.",
    )
    redundancy_confidence = models.FloatField(
        default=0.9,
        validators=[MinValueValidator(0.5), MaxValueValidator(1.0)],
        help_text="Consensus confidence at which adaptive redundancy stops asking the crowd.",
    )
    redundancy_model_prior = models.BooleanField(
        default=False,
        help_text="Adaptive redundancy with Dawid-Skene: also weigh a patch's votes by the model's posterior for it "
        "(from the round that queued it), so one crowd vote settles it when the two together give the vote's label "
        "redundancy_confidence or more. Only whether to stop asking changes: the label stays the votes' own.",
    )
    # Students who improve (annotations.students): more gold checks while a student is unknown or weak, fewer
    # once proven; a student below the certification threshold is recorded but not counted in consensus.
    adaptive_gold = models.BooleanField(
        default=False,
        help_text="Give each student a gold rate of their own: up to 3x gold_rate while their gold accuracy is "
        "unknown or low, down to gold_rate/3 once proven (see annotations.students). Off: gold_rate for everyone.",
    )
    certification_threshold = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Gold accuracy a student needs (over at least 10 gold answers) for their votes to count in "
        "consensus; below it their votes are recorded but not counted. 0 turns certification off.",
    )
    expert_routing = models.CharField(
        max_length=16,
        choices=ExpertRouting.choices,
        default=ExpertRouting.CONTESTED,
        help_text="contested: a round's batch goes to the crowd, and what it contests to experts; value: each patch "
        "goes straight to experts when the crowd's expected label accuracy per cost is below an expert's.",
    )
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class LabelClass(models.Model):
    project = models.ForeignKey(Project, related_name="label_classes", on_delete=models.CASCADE)
    name = models.CharField(max_length=100, validators=[no_control_characters])
    colour = models.CharField(
        max_length=7, default="#1f77b4", validators=[RegexValidator(r"^#[0-9a-fA-F]{6}$", "Use #rrggbb.")]
    )
    hotkey = models.CharField(max_length=1, validators=[RegexValidator(r"^[1-9]$", "Use a digit 1-9.")])
    order = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["project", "order"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="label_unique_name"),
            models.UniqueConstraint(fields=["project", "order"], name="label_unique_order"),
            models.UniqueConstraint(fields=["project", "hotkey"], name="label_unique_hotkey"),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, related_name="memberships", on_delete=models.CASCADE)
    project = models.ForeignKey(Project, related_name="memberships", on_delete=models.CASCADE)
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)
    # What is known of a student from the gold checks (annotations.students keeps these in step with the votes,
    # in one statement per refresh): their first answer on each gold patch, and how many of those were right.
    # Whether their votes count in consensus follows from these and the project's certification threshold.
    gold_answers = models.PositiveIntegerField(default=0)
    gold_correct = models.PositiveIntegerField(default=0)
    certified_at = models.DateTimeField(null=True, blank=True, help_text="When the student last became certified.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "project"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} as {self.role}"


def slide_upload_to(instance: Slide, filename: str) -> str:
    return f"slides/{instance.project_id}/{filename}"


class Slide(models.Model):
    class Status(models.TextChoices):
        PROCESSING = "processing", "Processing"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, related_name="slides", on_delete=models.CASCADE)
    name = models.CharField(max_length=255)
    file = models.FileField(upload_to=slide_upload_to, max_length=500, blank=True)
    format = models.CharField(max_length=32, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROCESSING)
    error = models.TextField(blank=True)
    message = models.TextField(blank=True, help_text="Non-error notes, e.g. 'no tissue found'.")
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    levels = models.PositiveSmallIntegerField(null=True, blank=True)
    mpp = models.FloatField(null=True, blank=True, help_text="Microns per pixel at level 0.")
    magnification = models.FloatField(null=True, blank=True)
    checksum = models.CharField(max_length=64, blank=True, db_index=True)
    size_bytes = models.BigIntegerField(default=0)
    thumbnail = models.FileField(upload_to="thumbnails/", max_length=500, blank=True)
    group = models.CharField(max_length=200, blank=True, help_text="Patient/case/group for held-out splits.")
    metadata = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "checksum"],
                condition=~Q(checksum="") & ~Q(status="failed"),
                name="slide_unique_checksum_per_project",
            )
        ]

    def __str__(self) -> str:
        return self.name


class Patch(models.Model):
    project = models.ForeignKey(Project, related_name="patches", on_delete=models.CASCADE)
    slide = models.ForeignKey(Slide, related_name="patches", on_delete=models.CASCADE)
    x = models.PositiveIntegerField(help_text="Left edge in level-0 pixels.")
    y = models.PositiveIntegerField(help_text="Top edge in level-0 pixels.")
    size = models.PositiveIntegerField(help_text="Edge in level-0 pixels.")
    magnification = models.FloatField()
    tissue_fraction = models.FloatField(default=1.0)
    is_gold = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slide", "y", "x"]
        constraints = [
            models.UniqueConstraint(fields=["slide", "x", "y", "size", "magnification"], name="patch_unique_geometry")
        ]
        indexes = [models.Index(fields=["project", "is_gold"])]

    def __str__(self) -> str:
        return f"patch {self.pk} of slide {self.slide_id} at ({self.x}, {self.y})"


# Tasks someone may still work on; every query and index of live tasks uses this one list.
LIVE_TASK_STATES = ["open", "leased"]


class AnnotationTask(models.Model):
    """One queue entry. A crowd task collects ``votes_needed`` votes, one person at a time.

    Its state changes only through the methods below (lease, release, record or retract a vote).
    A lease expires lazily: an expired one is simply available again (:meth:`available`), and the
    next :meth:`lease` takes it over.
    """

    class Kind(models.TextChoices):
        CROWD = "crowd", "Crowd"
        EXPERT = "expert", "Expert review"
        GOLD = "gold", "Gold check"

    class State(models.TextChoices):
        OPEN = "open", "Open"
        LEASED = "leased", "Leased"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"

    project = models.ForeignKey(Project, related_name="tasks", on_delete=models.CASCADE)
    patch = models.ForeignKey(Patch, related_name="tasks", on_delete=models.CASCADE)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CROWD)
    priority = models.FloatField(default=0.0)
    round = models.ForeignKey(
        "learner.TrainingRound", null=True, blank=True, related_name="tasks", on_delete=models.SET_NULL
    )
    arm = models.CharField(max_length=32, blank=True, help_text="Strategy that chose the patch, or 'random'.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.OPEN)
    votes_needed = models.PositiveSmallIntegerField(default=1)
    votes_received = models.PositiveSmallIntegerField(default=0)
    # db_default too: set-based SQL that writes tasks (the benchmarks' builds) gets it without naming it.
    route_reason = models.CharField(
        max_length=300,
        blank=True,
        default="",
        db_default="",
        help_text="Why the task went to the crowd or the experts (shown to admins).",
    )
    model_posterior = models.JSONField(
        null=True,
        blank=True,
        help_text="The model's posterior for the patch when a round queued it (label name -> probability); "
        "null for a patch queued before any model.",
    )
    lease_owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, related_name="leases", on_delete=models.SET_NULL
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # Leasing walks live tasks in priority order and stops at the first one the caller may take.
            models.Index(
                fields=["project", "kind", "-priority", "id"],
                condition=Q(state__in=LIVE_TASK_STATES),
                name="task_live_by_priority",
            ),
            models.Index(fields=["lease_owner", "state"]),
            # The admins' task list filtered to the expert or gold tasks, newest first: a few among a million
            # crowd tasks, which the filter otherwise finds by scanning them all. Crowd tasks never enter it,
            # and leasing or voting changes none of its columns.
            models.Index(
                fields=["project", "-id"],
                condition=Q(kind__in=["expert", "gold"]),
                name="task_review_newest",
            ),
            # The model's posterior per patch for a batch consensus (annotations.consensus_batch.model_priors):
            # each patch's latest crowd task that carries one, in patch order, without reading the crowd tasks
            # queued before any model or sorting them.
            models.Index(
                fields=["project", "patch", "-id"],
                condition=Q(kind="crowd", model_posterior__isnull=False),
                name="task_model_prior",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["patch", "kind"],
                condition=Q(state__in=LIVE_TASK_STATES) & ~Q(kind="gold"),
                name="task_one_live_per_patch_and_kind",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} task for patch {self.patch_id} ({self.state})"

    LEASE_FIELDS = ["state", "lease_owner", "lease_expires_at", "updated_at"]

    @staticmethod
    def live() -> Q:
        """Open or leased (an expired lease included): the task may still get votes."""
        return Q(state__in=LIVE_TASK_STATES)

    @staticmethod
    def available(now: Any) -> Q:
        """Open, or leased with an expired lease: anyone allowed may lease it now."""
        return Q(state=AnnotationTask.State.OPEN) | Q(state=AnnotationTask.State.LEASED, lease_expires_at__lt=now)

    @staticmethod
    def held_by(user: Any, now: Any) -> Q:
        """Leased to ``user`` with the lease still running."""
        return Q(lease_owner=user, state=AnnotationTask.State.LEASED, lease_expires_at__gte=now)

    def lease_is_running(self, now: Any) -> bool:
        """Leased, and the lease has not expired: the in-memory twin of ``~available(now)`` for a live task."""
        return self.state == self.State.LEASED and self.lease_expires_at is not None and self.lease_expires_at >= now

    def lease_is_held(self, user: Any, now: Any) -> bool:
        """The in-memory twin of :meth:`held_by`."""
        return self.lease_is_running(now) and self.lease_owner_id == getattr(user, "pk", user)

    def lease_is_held_by_other(self, user: Any, now: Any) -> bool:
        """Someone other than ``user`` holds a running lease on it."""
        return self.lease_is_running(now) and self.lease_owner_id not in (None, getattr(user, "pk", user))

    def lease(self, user: Any, expiry: Any, *, also_save: tuple[str, ...] = ()) -> None:
        """Lease to ``user`` until ``expiry`` (taking over an expired lease). Saves the lease and the
        fields named in ``also_save``; creates the task when it is new."""
        self.state, self.lease_owner, self.lease_expires_at = self.State.LEASED, user, expiry
        if self.pk is None:
            self.save()
        else:
            self.save(update_fields=[*also_save, *self.LEASE_FIELDS])

    def release(self) -> None:
        """Skip: back to the pool; a private gold task is cancelled instead. Saves."""
        self.state = self.State.CANCELLED if self.kind == self.Kind.GOLD else self.State.OPEN
        self.lease_owner, self.lease_expires_at = None, None
        self.save(update_fields=self.LEASE_FIELDS)

    def record_vote(self) -> None:
        """One more vote: the lease ends; done once it has all its votes, else open for the next person. Saves."""
        self.votes_received += 1
        self.lease_owner, self.lease_expires_at = None, None
        self.state = self.State.DONE if self.votes_received >= self.votes_needed else self.State.OPEN
        self.save(update_fields=["votes_received", *self.LEASE_FIELDS])

    def retract_vote(self) -> None:
        """A vote on it was undone: it needs one vote more. Does not save (the caller decides the lease)."""
        self.votes_received = max(0, self.votes_received - 1)


class TaskSkip(models.Model):
    """Someone skipped a task: it goes back to the pool, but not to them for a while."""

    task = models.ForeignKey(AnnotationTask, related_name="skips", on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, related_name="skips", on_delete=models.CASCADE)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["user", "task", "created_at"])]

    def __str__(self) -> str:
        return f"{self.user_id} skipped task {self.task_id}"


class VoteBatch(models.Model):
    """One bulk labelling action (annotations.bulk_voting: a lasso's "label all as C"): its votes carry it,
    so the action is undone as one. ``digest`` names the label and patch set, so the same action sent
    twice is refused while the first stands."""

    project = models.ForeignKey(Project, related_name="vote_batches", on_delete=models.CASCADE)
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, related_name="vote_batches", on_delete=models.RESTRICT)
    label = models.ForeignKey(LabelClass, related_name="vote_batches", on_delete=models.RESTRICT)
    source = models.CharField(max_length=16, default="map", help_text="Where the selection was made.")
    digest = models.CharField(max_length=64)
    n_patches = models.PositiveIntegerField(default=0, help_text="Patches selected.")
    n_votes = models.PositiveIntegerField(default=0, help_text="Votes cast (the rest already had this label).")
    created_at = models.DateTimeField(auto_now_add=True)
    undone_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "annotator", "digest"], name="vote_batch_digest")]

    def __str__(self) -> str:
        return f"batch {self.pk} of {self.n_votes} votes by {self.annotator_id}"


class Vote(models.Model):
    """Append-only. A correction adds a vote that supersedes the previous one (kept, inactive)."""

    class Provenance(models.TextChoices):
        """How the vote came in: exports carry it, so a training set can tell clicks from imports."""

        MANUAL = "manual", "Labelled in the platform"
        LABEL_IMPORT = "label-import", "Imported from a label file (CSV or GeoJSON patch squares)"
        REGION_IMPORT = "region-import", "Imported from QuPath region annotations"
        BULK = "bulk", "Labelled in bulk (a selection on the embedding map)"
        ACCEPTED_SUGGESTION = "accepted-suggestion", "Accepted the model's suggestion (the suggestion strip)"
        SIMILAR = "similar", "Labelled from 'more like this'"

    project = models.ForeignKey(Project, related_name="votes", on_delete=models.CASCADE)
    patch = models.ForeignKey(Patch, related_name="votes", on_delete=models.CASCADE)
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, related_name="votes", on_delete=models.RESTRICT)
    # RESTRICT, not PROTECT: a label with votes cannot be deleted alone, but its project can be.
    label = models.ForeignKey(LabelClass, related_name="votes", on_delete=models.RESTRICT)
    role = models.CharField(max_length=16, choices=Role.choices)
    task = models.ForeignKey(AnnotationTask, null=True, blank=True, related_name="votes", on_delete=models.SET_NULL)
    time_spent_ms = models.PositiveIntegerField(default=0)
    is_active = models.BooleanField(default=True)
    supersedes = models.OneToOneField(
        "self", null=True, blank=True, related_name="superseded_by", on_delete=models.RESTRICT
    )
    retracted_at = models.DateTimeField(null=True, blank=True)
    # db_default too: rows written with set-based SQL (benchmarks, bulk paths) get it without naming it.
    provenance = models.CharField(
        max_length=32, choices=Provenance.choices, default=Provenance.MANUAL, db_default=Provenance.MANUAL
    )
    batch = models.ForeignKey(
        VoteBatch, null=True, blank=True, related_name="votes", on_delete=models.RESTRICT, help_text="A bulk action."
    )
    model_version_shown = models.ForeignKey(
        "learner.ModelVersion",
        null=True,
        blank=True,
        related_name="+",
        on_delete=models.SET_NULL,
        help_text="The model version whose suggestion the annotator saw when voting, if any.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["patch", "annotator"], condition=Q(is_active=True), name="vote_one_active_per_annotator"
            )
        ]
        indexes = [
            models.Index(fields=["project", "annotator", "created_at"]),
            models.Index(fields=["patch", "annotator"], name="vote_patch_annotator"),
        ]

    def __str__(self) -> str:
        return f"vote {self.pk} by {self.annotator_id} on patch {self.patch_id}"


class Consensus(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        AGREED = "agreed", "Agreed"
        CONTESTED = "contested", "Contested"
        EXPERT = "expert", "Expert"

    patch = models.OneToOneField(Patch, related_name="consensus", on_delete=models.CASCADE)
    project = models.ForeignKey(Project, related_name="consensus", on_delete=models.CASCADE)
    label = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.RESTRICT)
    confidence = models.FloatField(default=0.0)
    posterior = models.JSONField(default=dict, blank=True, help_text="Label name -> probability.")
    method = models.CharField(max_length=32, choices=ConsensusMethod.choices)
    vote_count = models.PositiveIntegerField(default=0)
    agreement = models.FloatField(default=0.0, help_text="Share of votes agreeing with the label.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    model_version = models.ForeignKey(
        "learner.ModelVersion", null=True, blank=True, related_name="+", on_delete=models.SET_NULL
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["project", "status"])]

    def __str__(self) -> str:
        return f"consensus of patch {self.patch_id}: {self.status}"


class ReliabilityFit(models.Model):
    """The project's latest Dawid-Skene fit of its crowd (annotations.reliability): what routing reads.

    One row per project, rewritten by each refresh. ``students`` maps an annotator id (as a string) to
    ``{"counts": K x K expected counts (rows: truth, columns: answer, in ``labels`` order), "votes": n,
    "last_vote": ISO time}``; a student's confusion matrix is their counts row-normalised. Counts rather than
    matrices, so routing can pool the available students by summing them.
    """

    project = models.OneToOneField(Project, related_name="reliability_fit", on_delete=models.CASCADE)
    labels = models.JSONField(default=list, help_text="Label names, in the matrices' order.")
    priors = models.JSONField(default=list, help_text="Class priors, in label order.")
    students = models.JSONField(default=dict)
    n_votes = models.PositiveIntegerField(default=0, help_text="Crowd votes the fit used.")
    iterations = models.PositiveIntegerField(default=0)
    converged = models.BooleanField(default=False)
    seconds = models.FloatField(default=0.0)
    fitted_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"reliability fit of project {self.project_id} ({self.n_votes} votes)"
