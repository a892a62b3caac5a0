"""REST API for labelling many patches quickly: "more like this" (nearest neighbours in embedding space) and
the accept-the-model strip.

Blind labelling: what a crowd member may see of other patches is what a task shows them (the pixels), so
the neighbours of a patch come to them as ids, distances and image addresses only, never a consensus,
someone's vote or a model prediction; experts and admins also get each neighbour's consensus and their own
vote. The strip shows the model's answer, so it is refused (403) to whoever the project's
``suggestion_strip`` setting leaves out: crowd members by default.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from annotations import queue
from annotations.api import EXPERTS, ProjectScoped
from annotations.models import Consensus, LabelClass, Patch, Project, Role, Vote
from annotations.quick_votes import MAX_ITEMS, QuickVoteResult, cast_votes_in_one_action
from annotations.serializers import MAX_ID

from . import similar, suggestions
from .models import ModelVersion


def _image_url(patch_id: int) -> str:
    return f"/api/v1/patches/{patch_id}/image.jpeg"


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ValidationError({name: f"Give {name} as a whole number from {low} to {high}, not {raw[:20]!r}."})
    return int(raw)


def _label(project: Project, raw: Any) -> LabelClass:
    text = str(raw)
    labels = list(LabelClass.objects.filter(project=project).order_by("order"))
    by_id = text.isascii() and text.isdigit()
    found = next((lc for lc in labels if (str(lc.pk) == text if by_id else lc.name == text)), None)
    if found is None:
        names = ", ".join(lc.name for lc in labels)
        raise ValidationError({"label": f"Unknown label {text[:100]!r} for this project; use one of: {names}."})
    return found


# --- more like this ----------------------------------------------------------------------------------------------


class NeighbourSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    distance = serializers.FloatField(help_text="Cosine distance (0 identical, 1 unrelated) of the embeddings.")
    image_url = serializers.CharField()
    slide = serializers.IntegerField()
    consensus = serializers.DictField(required=False, allow_null=True, help_text="Experts and admins only.")
    my_vote = serializers.CharField(required=False, allow_null=True, help_text="Experts and admins only.")


class SimilarResultSerializer(serializers.Serializer):
    patch = serializers.IntegerField()
    embedding_model = serializers.CharField()
    indexed = serializers.IntegerField(help_text="Patches in the index.")
    neighbours = NeighbourSerializer(many=True)


class SimilarView(ProjectScoped):
    """The ``k`` patches of the project most like this one in embedding space, nearest first."""

    write_roles = None

    @extend_schema(
        parameters=[OpenApiParameter("k", int, description=f"Neighbours wanted (1-{similar.MAX_K}, default 100).")],
        responses={
            200: SimilarResultSerializer,
            409: OpenApiResponse(OpenApiTypes.OBJECT, description="No index yet, or the patch is not in it."),
        },
    )
    def get(self, request: Request, project_id: int, patch_id: int) -> Response:
        project, role = self.load(request, project_id)
        k = _int_param(request, "k", 100, 1, similar.MAX_K)
        if not Patch.objects.filter(project=project, pk=patch_id).exists():
            return Response({"detail": "No such patch in this project."}, status=404)
        try:
            found = similar.neighbours(project.pk, patch_id, k)
        except similar.NotIndexed as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        ids = found.patch_ids.tolist()
        slides = dict(Patch.objects.filter(project=project, pk__in=ids).values_list("pk", "slide_id"))
        rows: list[dict[str, Any]] = [
            {"id": pid, "distance": round(float(d), 5), "image_url": _image_url(pid), "slide": slides[pid]}
            for pid, d in zip(ids, found.distances.tolist(), strict=True)
            if pid in slides  # a patch deleted since the index was built
        ]
        if role != Role.CROWD:
            present = [r["id"] for r in rows]
            cons = {
                c.patch_id: {"label": c.label.name if c.label else None, "status": c.status}
                for c in Consensus.objects.filter(patch_id__in=present).select_related("label")
            }
            mine = dict(
                Vote.objects.filter(patch_id__in=present, annotator=request.user, is_active=True).values_list(
                    "patch_id", "label__name"
                )
            )
            for r in rows:
                r["consensus"] = cons.get(r["id"])
                r["my_vote"] = mine.get(r["id"])
        body = {"patch": patch_id, "embedding_model": found.model_id, "indexed": found.indexed, "neighbours": rows}
        return Response(body)


class LabelManyInputSerializer(serializers.Serializer):
    label = serializers.CharField(max_length=100, help_text="Label id or name.")
    patches = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID), min_length=1, max_length=MAX_ITEMS
    )

    def validate_patches(self, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise serializers.ValidationError("List each patch once.")
        return value


class LabelManyResultSerializer(serializers.Serializer):
    votes = serializers.ListField(child=serializers.IntegerField(), help_text="Ids of the votes cast.")
    skipped = serializers.ListField(child=serializers.IntegerField(), help_text="Patches you had already voted on.")
    consensus = serializers.DictField(help_text="Patch id -> its consensus label and status now.")


def _result(outcome: QuickVoteResult) -> dict[str, Any]:
    return {
        "votes": [v.pk for v in outcome.votes],
        "skipped": outcome.skipped,
        "consensus": {
            str(pid): {"label": c.label.name if c.label else None, "status": c.status}
            for pid, c in outcome.consensus.items()
        },
    }


def _cast(project: Project, request: Request, role: str, items: list[tuple[int, Any]], **kwargs: Any) -> Response:
    try:
        outcome = cast_votes_in_one_action(project, request.user, role, items, **kwargs)
    except queue.QueueError as exc:
        return Response({"detail": str(exc)}, status=exc.status_code)
    return Response(_result(outcome), status=status.HTTP_201_CREATED)


class SimilarLabelView(ProjectScoped):
    """Label some of a patch's neighbours (and the patch itself, if listed) at once: experts and admins."""

    roles = EXPERTS
    write_roles = EXPERTS

    @extend_schema(request=LabelManyInputSerializer, responses={201: LabelManyResultSerializer})
    def post(self, request: Request, project_id: int, patch_id: int) -> Response:
        project, role = self.load(request, project_id)
        data = LabelManyInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if not Patch.objects.filter(project=project, pk=patch_id).exists():
            return Response({"detail": "No such patch in this project."}, status=404)
        label = _label(project, data.validated_data["label"])
        items = [(pid, label.pk) for pid in data.validated_data["patches"]]
        return _cast(project, request, role, items, provenance=Vote.Provenance.SIMILAR)


# --- accept the model --------------------------------------------------------------------------------------------


class StripItemSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    image_url = serializers.CharField()
    probability = serializers.FloatField(help_text="The model's probability of the strip's class.")
    uncertainty = serializers.FloatField()
    runner_up = serializers.CharField(help_text="The model's second choice: what flipping a patch labels it.")


class StripSerializer(serializers.Serializer):
    model_version = serializers.IntegerField(allow_null=True)
    label = serializers.CharField()
    order = serializers.ChoiceField(choices=suggestions.ORDERS)
    patches = StripItemSerializer(many=True)


def _strip_project(view: ProjectScoped, request: Request, project_id: int) -> tuple[Project, str]:
    project, role = view.load(request, project_id)
    if not suggestions.strip_allowed(project, role):
        raise PermissionDenied(
            f"This project does not let its {role} members accept the model's suggestions "
            f"(its 'suggestion_strip' setting is {project.suggestion_strip!r}); label patches one at a time."
        )
    return project, role


class SuggestionStripView(ProjectScoped):
    """Patches the latest model assigns to one class, for the accept-the-model strip."""

    write_roles = None

    @extend_schema(
        parameters=[
            OpenApiParameter("label", str, description="Label id or name (default: the first label)."),
            OpenApiParameter("n", int, description=f"Patches wanted (1-{suggestions.MAX_STRIP}, default 24)."),
            OpenApiParameter(
                "order", str, enum=list(suggestions.ORDERS), description="Most confident first, or most uncertain."
            ),
        ],
        responses={
            200: StripSerializer,
            409: OpenApiResponse(OpenApiTypes.OBJECT, description="No labels, or the model does not know the label."),
        },
    )
    def get(self, request: Request, project_id: int) -> Response:
        project, role = _strip_project(self, request, project_id)
        n = _int_param(request, "n", 24, 1, suggestions.MAX_STRIP)
        order = request.query_params.get("order") or "confidence"
        if order not in suggestions.ORDERS:
            raise ValidationError({"order": f"Use one of: {', '.join(suggestions.ORDERS)}."})
        raw = request.query_params.get("label")
        label = _label(project, raw) if raw not in (None, "") else project.label_classes.order_by("order").first()
        if label is None:
            return Response({"detail": "The project has no labels yet."}, status=409)
        version = suggestions.latest_version(project)
        if version is None:
            return Response({"model_version": None, "label": label.name, "order": order, "patches": []})
        if label.name not in version.class_names:
            return Response(
                {"detail": f"The latest model does not know the label {label.name!r}; run a round first."}, status=409
            )
        names = version.class_names
        items = suggestions.strip(project, request.user, role, version, names.index(label.name), n, order)
        patches = [
            {
                "id": it.patch_id,
                "image_url": _image_url(it.patch_id),
                "probability": it.probability,
                "uncertainty": it.uncertainty,
                "runner_up": names[it.runner_up],
            }
            for it in items
        ]
        return Response({"model_version": version.pk, "label": label.name, "order": order, "patches": patches})


class RelabelSerializer(serializers.Serializer):
    patch = serializers.IntegerField(min_value=1, max_value=MAX_ID)
    label = serializers.CharField(max_length=100)


class AcceptInputSerializer(serializers.Serializer):
    label = serializers.CharField(max_length=100, help_text="The strip's class (id or name).")
    model_version = serializers.IntegerField(min_value=1, max_value=MAX_ID, help_text="The version the strip showed.")
    accept = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID), max_length=MAX_ITEMS, default=list
    )
    relabel = RelabelSerializer(many=True, required=False, default=list, help_text="Patches flipped to another label.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        ids = list(attrs["accept"]) + [r["patch"] for r in attrs["relabel"]]
        if not ids:
            raise serializers.ValidationError("Nothing to record: accept or relabel at least one patch.")
        if len(ids) > MAX_ITEMS:
            raise serializers.ValidationError(f"At most {MAX_ITEMS} patches in one action.")
        if len(set(ids)) != len(ids):
            raise serializers.ValidationError("List each patch once (accepted or relabelled, not both).")
        return attrs


class SuggestionAcceptView(ProjectScoped):
    """Enter in the strip: the accepted patches get the strip's label and the flipped ones theirs, as the
    caller's votes, in one transaction (provenance ``accepted-suggestion`` for the accepted, ``single`` for
    the flipped; both record the model version shown)."""

    write_roles = None

    @extend_schema(request=AcceptInputSerializer, responses={201: LabelManyResultSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, role = _strip_project(self, request, project_id)
        data = AcceptInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        version = ModelVersion.objects.filter(project=project, pk=data.validated_data["model_version"]).first()
        if version is None:
            raise ValidationError({"model_version": "No such model version in this project."})
        label = _label(project, data.validated_data["label"])
        relabels = [(r["patch"], _label(project, r["label"]).pk) for r in data.validated_data["relabel"]]
        # One transaction for the whole Enter: the accepted and the flipped land together or not at all.
        accept = [(pid, label.pk) for pid in data.validated_data["accept"]]
        shown = {"model_version_shown": version.pk, "crowd_without_task": role == Role.CROWD}
        try:
            with transaction.atomic():
                accepted = cast_votes_in_one_action(
                    project, request.user, role, accept, provenance=Vote.Provenance.ACCEPTED_SUGGESTION, **shown
                )
                flipped = cast_votes_in_one_action(
                    project, request.user, role, relabels, provenance=Vote.Provenance.MANUAL, **shown
                )
        except queue.QueueError as exc:
            return Response({"detail": str(exc)}, status=exc.status_code)
        body = _result(accepted)
        more = _result(flipped)
        body["votes"] += more["votes"]
        body["skipped"] += more["skipped"]
        body["consensus"].update(more["consensus"])
        if role == Role.CROWD:
            body["consensus"] = {}  # blind: the crowd does not learn the consensus from the strip either
        return Response(body, status=status.HTTP_201_CREATED)
