"""REST API of bulk labelling (annotations.bulk_voting): label a selection as one action, undo it as one."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from . import bulk_voting
from .api import EXPERTS, ProjectScoped, _error
from .models import VoteBatch
from .serializers import MAX_ID


def _id() -> serializers.IntegerField:
    return serializers.IntegerField(min_value=1, max_value=MAX_ID)


class BulkVoteInputSerializer(serializers.Serializer):
    patches = serializers.ListField(
        child=_id(),
        min_length=1,
        max_length=bulk_voting.MAX_BULK_PATCHES,
        help_text=f"The selected patch ids (at most {bulk_voting.MAX_BULK_PATCHES:,}).",
    )
    label = serializers.CharField(max_length=100, help_text="Label id or name.")
    exclude = serializers.ListField(
        child=_id(),
        required=False,
        default=list,
        max_length=bulk_voting.MAX_BULK_PATCHES,
        help_text="Patches of the selection not to label ('label all but these').",
    )
    source = serializers.ChoiceField(choices=["map", "viewer", "gallery"], required=False, default="map")


class VoteBatchSerializer(serializers.ModelSerializer):
    label_name = serializers.CharField(source="label.name", read_only=True)

    class Meta:
        model = VoteBatch
        fields = ["id", "label", "label_name", "source", "n_patches", "n_votes", "created_at", "undone_at"]


class BulkVoteResultSerializer(serializers.Serializer):
    batch = VoteBatchSerializer()
    created = serializers.IntegerField(help_text="Votes cast.")
    corrected = serializers.IntegerField(help_text="Of those, replacing an earlier vote of yours.")
    unchanged = serializers.IntegerField(help_text="Patches that already carried your vote for this label.")


class BulkUndoResultSerializer(serializers.Serializer):
    batch = VoteBatchSerializer()
    retracted = serializers.IntegerField()
    restored = serializers.IntegerField(help_text="Your earlier votes the action had replaced, cast again.")
    skipped = serializers.IntegerField(help_text="Votes of the action you had already changed one by one.")


class BulkVoteView(ProjectScoped):
    """Experts and admins label a selection (a lasso on the map) as one action."""

    roles = EXPERTS
    write_roles = EXPERTS

    @extend_schema(request=BulkVoteInputSerializer, responses={201: BulkVoteResultSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        data = BulkVoteInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        try:
            outcome = bulk_voting.cast_bulk_votes(
                project, request.user, role, patch_ids=v["patches"], label=v["label"], exclude=v["exclude"],
                source=v["source"],
            )  # fmt: skip
        except bulk_voting.VoteError as exc:
            return _error(exc)
        body = {
            "batch": VoteBatchSerializer(outcome.batch).data,
            "created": outcome.created,
            "corrected": outcome.corrected,
            "unchanged": outcome.unchanged,
        }
        return Response(body, status=status.HTTP_201_CREATED)


class BulkUndoView(ProjectScoped):
    roles = EXPERTS
    write_roles = EXPERTS

    @extend_schema(request=None, responses=BulkUndoResultSerializer)
    def post(self, request: Request, project_id: int, batch_id: int) -> Response:
        project, role = self.load(request, project_id)
        try:
            outcome = bulk_voting.undo_bulk_votes(project, request.user, role, batch_id)
        except bulk_voting.VoteError as exc:
            return _error(exc)
        body = {
            "batch": VoteBatchSerializer(outcome.batch).data,
            "retracted": outcome.retracted,
            "restored": outcome.restored,
            "skipped": outcome.skipped,
        }
        return Response(body)
