from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework import serializers

from .models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Role, Vote


class LabelClassSerializer(serializers.ModelSerializer):
    class Meta:
        model = LabelClass
        fields = ["id", "name", "colour", "hotkey", "order"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        project = self.context["project"]
        others = LabelClass.objects.filter(project=project)
        if self.instance is not None:
            others = others.exclude(pk=self.instance.pk)
        for field in ("name", "hotkey", "order"):
            if field in attrs and others.filter(**{field: attrs[field]}).exists():
                raise serializers.ValidationError({field: f"Another label in this project has this {field}."})
        return attrs


class ProjectSerializer(serializers.ModelSerializer):
    label_classes = LabelClassSerializer(many=True, read_only=True)
    role = serializers.SerializerMethodField()

    class Meta:
        model = Project
        fields = [
            "id",
            "name",
            "description",
            "patch_size",
            "magnification",
            "votes_required",
            "consensus_method",
            "expert_weight",
            "contested_threshold",
            "gold_rate",
            "training_mode",
            "lease_minutes",
            "query_strategy",
            "batch_size",
            "random_fraction",
            "backbone",
            "backbone_weights",
            "train_mode",
            "training_labels",
            "seed",
            "suggestion_strip",
            "suggestion_weight",
            "expert_cost",
            "crowd_cost",
            "adaptive_redundancy",
            "redundancy_confidence",
            "redundancy_model_prior",
            "adaptive_gold",
            "certification_threshold",
            "expert_routing",
            "created_at",
            "label_classes",
            "role",
        ]
        read_only_fields = ["created_at"]

    def get_role(self, project: Project) -> str | None:
        roles = self.context.get("roles") or {}
        return roles.get(project.pk)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A backbone the workers could not build with its weights is refused here, not by a failed round."""
        current = self.instance
        name = attrs.get("backbone", current.backbone if current else Project._meta.get_field("backbone").default)
        weights = attrs.get("backbone_weights", current.backbone_weights if current else "")
        if current is None or (name, weights) != (current.backbone, current.backbone_weights):
            check_project_backbone(name, weights)
        check_model_prior(attrs, current)
        return attrs


def check_model_prior(attrs: dict[str, Any], current: Project | None) -> None:
    """``redundancy_model_prior`` weighs a Dawid-Skene posterior (a likelihood of the votes) by the model's: with
    a vote-share method, or without adaptive redundancy, it would do nothing, so it is refused with the reason."""

    def value(field: str) -> Any:
        return attrs.get(field, getattr(current, field) if current else Project._meta.get_field(field).default)

    if not value("redundancy_model_prior"):
        return
    if value("consensus_method") != "dawid_skene":
        raise serializers.ValidationError(
            {"redundancy_model_prior": "needs consensus_method dawid_skene (the other methods' posteriors are vote "
             "shares, which a model prior cannot weigh); turn it off first to change the method."}
        )  # fmt: skip
    if not value("adaptive_redundancy"):
        raise serializers.ValidationError(
            {"redundancy_model_prior": "needs adaptive_redundancy on: it only decides when to stop asking the crowd."}
        )


def check_project_backbone(name: str, weights: str) -> None:
    """Raise a ValidationError on the field at fault if the backbone ``name`` cannot be built with ``weights``
    (the project's own file or folder, or the platform's LEARNER_PRETRAINED): only the file's tensor shapes
    are read and the network is built without memory, so even a foundation model's checkpoint takes a moment."""
    from learner.conf import learner_settings
    from learner.core import sources
    from learner.core.backbone import check_backbone
    from learner.core.errors import LearnerError
    from learner.embedding import backbone_spec

    field = "backbone" if not sources.known_name(name) else "backbone_weights"
    try:
        check_backbone(backbone_spec(name, learner_settings(), weights))
    except LearnerError as exc:
        raise serializers.ValidationError({field: str(exc)}) from exc
    except OSError as exc:  # a path the file system refuses outright (too long, unreadable)
        raise serializers.ValidationError({"backbone_weights": f"The weights path cannot be read: {exc}."}) from exc


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.SlugRelatedField(
        source="user", slug_field="username", queryset=get_user_model().objects.all()
    )

    class Meta:
        model = Membership
        fields = ["id", "username", "role", "created_at"]
        read_only_fields = ["created_at"]


class PatchSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()
    context_url = serializers.SerializerMethodField()
    slide_name = serializers.CharField(source="slide.name", read_only=True)

    class Meta:
        model = Patch
        fields = [
            "id",
            "slide",
            "slide_name",
            "x",
            "y",
            "size",
            "magnification",
            "tissue_fraction",
            "is_gold",
            "image_url",
            "context_url",
        ]

    def to_representation(self, patch: Patch) -> dict[str, Any]:
        data = super().to_representation(patch)
        if self.context.get("role") == Role.CROWD:
            # Blind checks: a student cannot tell a gold patch from real work.
            data["is_gold"] = False
        return data

    def get_image_url(self, patch: Patch) -> str:
        return f"/api/v1/patches/{patch.pk}/image.jpeg"

    def get_context_url(self, patch: Patch) -> str:
        # A margin of one patch on every side: the patch in a 3x field of surrounding tissue.
        return f"/api/v1/patches/{patch.pk}/image.jpeg?context={patch.project.patch_size}"


class TaskSerializer(serializers.ModelSerializer):
    """A task as its annotator sees it. Pass ``context={"role": ...}``: to the crowd a gold check
    looks like any crowd task (kind, priority and arm would give it away)."""

    patch = PatchSerializer(read_only=True)

    def to_representation(self, task: AnnotationTask) -> dict[str, Any]:
        data = super().to_representation(task)
        if self.context.get("role") == Role.CROWD and task.kind == AnnotationTask.Kind.GOLD:
            data.update(kind=AnnotationTask.Kind.CROWD, priority=0.0, arm="")
        if self.context.get("role") != Role.ADMIN:
            del data["route_reason"]  # it speaks of the students' reliabilities: admins only
        return data

    class Meta:
        model = AnnotationTask
        fields = [
            "id",
            "kind",
            "priority",
            "arm",
            "state",
            "votes_needed",
            "votes_received",
            "lease_expires_at",
            "route_reason",
            "patch",
        ]


class AdminTaskSerializer(serializers.ModelSerializer):
    """A queue entry as the project's admins list it (annotations.api.TaskListView): with why it was routed."""

    class Meta:
        model = AnnotationTask
        fields = [
            "id",
            "patch",
            "kind",
            "state",
            "priority",
            "round",
            "arm",
            "votes_needed",
            "votes_received",
            "route_reason",
            "created_at",
        ]


class AdminTaskPageSerializer(serializers.Serializer):
    """One page of the admins' task list: ``next_before`` is the ``before`` of the next page (null at the end)."""

    results = AdminTaskSerializer(many=True)
    next_before = serializers.IntegerField(allow_null=True)


# The annotator's hot path answers with these two functions: the same dicts as TaskSerializer and
# VoteSerializer (tests/integration/test_hot_path.py compares them), without building a serializer's
# fields on every call (about a millisecond per task on these machines). The serializers stay the
# schema; a field added there must be added here (the comparison test fails until it is).
_DATETIME = serializers.DateTimeField()


def _datetime(value: Any) -> str | None:
    return None if value is None else _DATETIME.to_representation(value)


def task_data(task: AnnotationTask, role: str) -> dict[str, Any]:
    """``TaskSerializer(task, context={"role": role}).data`` (the task's patch, slide and project loaded)."""
    patch = task.patch
    crowd = role == Role.CROWD
    blind = crowd and task.kind == AnnotationTask.Kind.GOLD  # a gold check looks like any crowd task
    data = {
        "id": task.pk,
        "kind": AnnotationTask.Kind.CROWD.value if blind else task.kind,
        "priority": 0.0 if blind else float(task.priority),
        "arm": "" if blind else task.arm,
        "state": task.state,
        "votes_needed": task.votes_needed,
        "votes_received": task.votes_received,
        "lease_expires_at": _datetime(task.lease_expires_at),
        "patch": {
            "id": patch.pk,
            "slide": patch.slide_id,
            "slide_name": patch.slide.name,
            "x": patch.x,
            "y": patch.y,
            "size": patch.size,
            "magnification": float(patch.magnification),
            "tissue_fraction": float(patch.tissue_fraction),
            "is_gold": False if crowd else patch.is_gold,
            "image_url": f"/api/v1/patches/{patch.pk}/image.jpeg",
            "context_url": f"/api/v1/patches/{patch.pk}/image.jpeg?context={patch.project.patch_size}",
        },
    }
    if role == Role.ADMIN:
        data["route_reason"] = task.route_reason
    return data


def vote_data(vote: Vote) -> dict[str, Any]:
    """``VoteSerializer(vote).data`` (the vote's annotator and label loaded)."""
    return {
        "id": vote.pk,
        "patch": vote.patch_id,
        "annotator": vote.annotator.username,
        "label": vote.label_id,
        "label_name": vote.label.name,
        "role": vote.role,
        "task": vote.task_id,
        "time_spent_ms": vote.time_spent_ms,
        "is_active": vote.is_active,
        "supersedes": vote.supersedes_id,
        "retracted_at": _datetime(vote.retracted_at),
        "provenance": vote.provenance,
        "model_version_shown": vote.model_version_shown_id,
        "created_at": _datetime(vote.created_at),
    }


class VoteSerializer(serializers.ModelSerializer):
    annotator = serializers.CharField(source="annotator.username", read_only=True)
    label_name = serializers.CharField(source="label.name", read_only=True)

    class Meta:
        model = Vote
        fields = [
            "id",
            "patch",
            "annotator",
            "label",
            "label_name",
            "role",
            "task",
            "time_spent_ms",
            "is_active",
            "supersedes",
            "retracted_at",
            "provenance",
            "model_version_shown",
            "created_at",
        ]


MAX_ID = 2**63 - 1  # PostgreSQL bigint: no row has a larger id, and the query would fail on one


class VoteInputSerializer(serializers.Serializer):
    patch = serializers.IntegerField(min_value=1, max_value=MAX_ID)
    label = serializers.CharField(max_length=100, help_text="Label id or name.")
    task = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=MAX_ID)
    time_spent_ms = serializers.IntegerField(required=False, default=0, min_value=0, max_value=MAX_ID)
    next = serializers.BooleanField(required=False, default=False, help_text="Also lease and return the next task.")
    ahead = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Also lease and return a fresh task as 'ahead' (the client already holds the one it shows next).",
    )


class GoldInputSerializer(serializers.Serializer):
    gold = serializers.BooleanField(default=True, help_text="false unmarks the patch.")


class RoleInputSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)


class SkipResultSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    state = serializers.ChoiceField(choices=AnnotationTask.State.choices)


class UndoResultSerializer(serializers.Serializer):
    task = TaskSerializer(allow_null=True, help_text="The task to show again, or null.")


class CorrectionInputSerializer(serializers.Serializer):
    label = serializers.CharField(max_length=100, help_text="Label id or name.")


class ConsensusSerializer(serializers.ModelSerializer):
    label_name = serializers.CharField(source="label.name", read_only=True, default=None)

    class Meta:
        model = Consensus
        fields = [
            "label",
            "label_name",
            "confidence",
            "posterior",
            "method",
            "vote_count",
            "agreement",
            "status",
            "updated_at",
        ]


class PatchDetailSerializer(serializers.Serializer):
    """A patch with what the caller may see of its votes and consensus (crowd: only their own)."""

    patch = PatchSerializer()
    votes = VoteSerializer(many=True)
    consensus = ConsensusSerializer(allow_null=True)


class VoteResultSerializer(serializers.Serializer):
    vote = VoteSerializer()
    consensus = ConsensusSerializer(required=False, help_text="Experts and admins only.")
    next = TaskSerializer(required=False, allow_null=True, help_text="With next=true: the next lease.")
    ahead = TaskSerializer(required=False, allow_null=True, help_text="With ahead=true: one more lease.")
    gold = serializers.DictField(required=False, help_text="Training mode, after a gold check: the answer.")


class CorrectionResultSerializer(serializers.Serializer):
    vote = VoteSerializer()


class NextTaskSerializer(TaskSerializer):
    """The schema of next-task's answer (the view adds ``ahead`` to a TaskSerializer's data)."""

    # Not read-only: a read-only field would be a required property of the answer, and ahead is there
    # only with ?ahead=1.
    ahead = TaskSerializer(required=False, allow_null=True, help_text="With ?ahead=1.")

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "ahead"]


class OverlayColumnsSerializer(serializers.Serializer):
    id = serializers.ListField(child=serializers.IntegerField())
    x = serializers.ListField(child=serializers.IntegerField())
    y = serializers.ListField(child=serializers.IntegerField())
    size = serializers.ListField(child=serializers.IntegerField())
    label = serializers.ListField(
        child=serializers.IntegerField(allow_null=True), help_text="Index into labels, or null."
    )
    status = serializers.ListField(
        child=serializers.IntegerField(allow_null=True), help_text="Index into statuses, or null."
    )
    is_gold = serializers.ListField(child=serializers.BooleanField())


class OverlaySerializer(serializers.Serializer):
    """One slide's patch grid with consensus labels, one array per field (crowd: only patches they voted on)."""

    slide = serializers.IntegerField()
    count = serializers.IntegerField()
    labels = serializers.ListField(child=serializers.CharField())
    colours = serializers.ListField(child=serializers.CharField())
    statuses = serializers.ListField(child=serializers.CharField())
    patches = OverlayColumnsSerializer()


class LabelImportInputSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="A QuPath GeoJSON (.geojson/.json) or a CSV with slide,x,y,label.")
    slide = serializers.CharField(required=False, help_text="Slide name for rows that name none.")


class LabelImportResultSerializer(serializers.Serializer):
    imported = serializers.IntegerField()
    unchanged = serializers.IntegerField()


class RegionImportInputSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="QuPath GeoJSON annotations (Polygon/MultiPolygon with a classification).")
    slide = serializers.IntegerField(min_value=1, max_value=MAX_ID, help_text="The slide the regions were drawn on.")
    min_coverage = serializers.FloatField(
        required=False,
        default=0.5,
        min_value=0.01,
        max_value=1.0,
        help_text="Share of a patch's area a region of one class must cover for the patch to get that label.",
    )


class RegionImportResultSerializer(LabelImportResultSerializer):
    regions = serializers.IntegerField()
    patches_covered = serializers.IntegerField()
    overlapping = serializers.IntegerField(help_text="Patches covered enough by two classes: the larger share won.")
    by_label = serializers.DictField(child=serializers.IntegerField())
