from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.urls import reverse
from rest_framework import serializers

from .models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Vote


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
            "train_mode",
            "seed",
            "created_at",
            "label_classes",
            "role",
        ]
        read_only_fields = ["created_at"]

    def get_role(self, project: Project) -> str | None:
        roles = self.context.get("roles") or {}
        return roles.get(project.pk)


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

    def get_image_url(self, patch: Patch) -> str:
        return f"/api/v1/patches/{patch.pk}/image.jpeg"

    def get_context_url(self, patch: Patch) -> str:
        # A margin of one patch on every side: the patch in a 3x field of surrounding tissue.
        return f"/api/v1/patches/{patch.pk}/image.jpeg?context={patch.project.patch_size}"


class TaskSerializer(serializers.ModelSerializer):
    patch = PatchSerializer(read_only=True)

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
            "patch",
        ]


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
            "created_at",
        ]


class VoteInputSerializer(serializers.Serializer):
    patch = serializers.IntegerField()
    label = serializers.CharField(help_text="Label id or name.")
    task = serializers.IntegerField(required=False, allow_null=True)
    time_spent_ms = serializers.IntegerField(required=False, default=0, min_value=0)
    next = serializers.BooleanField(required=False, default=False, help_text="Also lease and return the next task.")
    ahead = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Also lease and return a fresh task as 'ahead' (the client already holds the one it shows next).",
    )


class CorrectionInputSerializer(serializers.Serializer):
    label = serializers.CharField(help_text="Label id or name.")


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


def task_links(task: AnnotationTask) -> dict[str, str]:
    return {"skip": reverse("task-skip", kwargs={"project_id": task.project_id, "task_id": task.pk})}
