"""REST API for training rounds, predictions (heatmap) and the learning curve."""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from annotations.api import ADMIN_ONLY, EXPERTS, ProjectScoped
from annotations.models import Patch
from annotations.zip_stream import streaming_response
from histoloop.schema import ErrorSerializer

from . import model_export, scores, services
from .models import ModelVersion, TrainingRound


class RoundSerializer(serializers.ModelSerializer):
    requested_by = serializers.CharField(source="requested_by.username", default=None, allow_null=True, read_only=True)
    model_version = serializers.SerializerMethodField()

    class Meta:
        model = TrainingRound
        fields = [
            "id",
            "number",
            "state",
            "stage",
            "progress",
            "error",
            "cancel_requested",
            "strategy",
            "train_mode",
            "n_labels",
            "metrics",
            "timings",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "model_version",
        ]

    def get_model_version(self, round_: TrainingRound) -> int | None:
        version = getattr(round_, "model_version", None)
        return version.pk if version else None


class RoundListView(ProjectScoped):
    write_roles = ADMIN_ONLY

    @extend_schema(responses=RoundSerializer(many=True))
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        services.fail_stale_rounds(project)
        rounds = TrainingRound.objects.filter(project=project).select_related("requested_by", "model_version")
        return Response(RoundSerializer(rounds.order_by("-number")[:200], many=True).data)

    @extend_schema(request=None, responses={201: RoundSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        try:
            round_ = services.start_round(project, request.user)
        except services.RoundConflict as exc:
            return Response({"detail": str(exc), "active_round": exc.active.pk}, status=status.HTTP_409_CONFLICT)
        except services.RoundError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(RoundSerializer(round_).data, status=status.HTTP_201_CREATED)


class RoundCancelView(ProjectScoped):
    write_roles = ADMIN_ONLY

    @extend_schema(request=None, responses=RoundSerializer)
    def post(self, request: Request, project_id: int, round_id: int) -> Response:
        project, _ = self.load(request, project_id)
        round_ = TrainingRound.objects.filter(project=project, pk=round_id).first()
        if round_ is None:
            return Response({"detail": "No such round in this project."}, status=404)
        try:
            round_ = services.cancel_round(round_)
        except services.RoundError as exc:
            return Response({"detail": str(exc)}, status=409)
        return Response(RoundSerializer(round_).data)


class HeatmapView(ProjectScoped):
    """Per-patch probability of one class from the latest model, for a slide overlay.

    Columnar like the overlay (one array per field), so a slide of 50,000 patches is a few hundred
    kilobytes of arrays, not 50,000 JSON objects. The latest model is the newest version that has
    classes (a version saved without any cannot be drawn)."""

    write_roles = None

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        slide = request.query_params.get("slide", "")
        if not slide.isdigit():
            return Response({"detail": "Give the slide id as ?slide=<id>."}, status=400)
        version = ModelVersion.objects.filter(project=project).exclude(class_names=[]).order_by("-created_at").first()
        label = request.query_params.get("label")
        columns: dict[str, list[Any]] = {key: [] for key in ("id", "x", "y", "size", "prob")}
        if version is None:
            return Response({"model_version": None, "label": label, "count": 0, "patches": columns})
        names = version.class_names
        if label is None:
            label = names[0]
        if label not in names:
            return Response({"detail": f"Unknown label {label!r}; the model knows {', '.join(names)}."}, status=400)
        k = names.index(label)
        ids, probs = scores.for_slide(version, int(slide))
        # One array per field (as the overlay reads them): no row tuple per patch for the garbage collector.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT array_agg(id), array_agg(x), array_agg(y), array_agg(size) FROM (SELECT id, x, y, size"
                f" FROM {Patch._meta.db_table} WHERE project_id = %s AND slide_id = %s ORDER BY id) AS slide_patches",
                [project.pk, int(slide)],
            )
            rows = np.array([values or () for values in cursor.fetchone()], dtype=np.int64).reshape(4, -1).T
        rows = rows[np.argsort(rows[:, 0], kind="stable")]  # in id order whatever the plan (sorted: one pass)
        if len(ids) and len(rows):
            at = np.minimum(np.searchsorted(ids, rows[:, 0]), len(ids) - 1)
            scored = ids[at] == rows[:, 0]
            for i, key in enumerate(("id", "x", "y", "size")):
                columns[key] = rows[scored, i].tolist()
            columns["prob"] = np.round(probs[at[scored], k].astype(np.float64), 5).tolist()
        return Response(
            {
                "model_version": version.pk,
                "round": version.round.number,
                "label": label,
                "count": len(columns["id"]),
                "patches": columns,
            }
        )


class PredictionView(ProjectScoped):
    """The latest model's class probabilities for one patch (experts/admins)."""

    roles = ("admin", "expert")

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, project_id: int, patch_id: int) -> Response:
        project, _ = self.load(request, project_id)
        patch = Patch.objects.filter(project=project, pk=patch_id).only("pk", "slide_id").first()
        if patch is None:
            return Response({"detail": "No such patch in this project."}, status=404)
        score = scores.for_patch(project.pk, patch.slide_id, patch.pk)
        if score is None:
            return Response({"detail": "No model has scored this patch yet; run a round."}, status=404)
        names = score.model_version.class_names
        body: dict[str, Any] = {
            "model_version": score.model_version.pk,
            "probs": dict(zip(names, [round(p, 5) for p in score.probs], strict=True)),
            "predicted": names[score.predicted],
            "uncertainty": score.uncertainty,
        }
        return Response(body)


@lru_cache(maxsize=2)
def _load_classifier(weights_path: str) -> Any:
    from .core.classifier import load_model

    return load_model(weights_path)


class GradCamView(ProjectScoped):
    """Grad-CAM of the latest model on one patch, as a PNG overlay (experts/admins; ~1 s on CPU)."""

    roles = ("admin", "expert")

    @extend_schema(responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request: Request, project_id: int, patch_id: int) -> HttpResponse:
        from annotations.slides.tiles import read_patch

        from .core.errors import LearnerError
        from .core.gradcam import grad_cam

        project, _ = self.load(request, project_id)
        patch = Patch.objects.filter(project=project, pk=patch_id).select_related("slide", "project").first()
        if patch is None:
            return Response({"detail": "No such patch in this project."}, status=404)
        version = ModelVersion.objects.filter(project=project).order_by("-created_at").first()
        if version is None:
            return Response({"detail": "No model has been trained yet; run a round first."}, status=404)
        label = request.query_params.get("label")
        if label is not None and label not in version.class_names:
            return Response(
                {"detail": f"Unknown label {label!r}; the model knows {', '.join(version.class_names)}."}, status=400
            )
        image = read_patch(patch)
        try:
            heat, explained = grad_cam(
                _load_classifier(version.weights_path), image, version.class_names.index(label) if label else None
            )
        except LearnerError as exc:
            return Response({"detail": str(exc)}, status=400)
        overlay = _overlay(image, heat)
        buffer = io.BytesIO()
        overlay.save(buffer, format="PNG")
        response = HttpResponse(buffer.getvalue(), content_type="image/png")
        response["X-Explained-Class"] = version.class_names[explained]
        response["Cache-Control"] = "private, max-age=3600"
        return response


def _overlay(image: Any, heat: Any) -> Any:
    """Blend a jet-coloured heatmap over the patch (matplotlib's colormap, no pyplot)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    base = image.convert("RGB").resize((heat.shape[1], heat.shape[0]))
    colours = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colours), alpha=0.4)


class _FormatIsNotARenderer(DefaultContentNegotiation):
    """``?format=`` names the export's format on the export endpoint, not one of DRF's renderers (which
    would answer a bare 404 for ``onnx``): errors are rendered as JSON whatever it says."""

    def filter_renderers(self, renderers: list[BaseRenderer], format: str) -> list[BaseRenderer]:
        return [r for r in renderers if r.format == format] or list(renderers)


class ModelExportView(ProjectScoped):
    """A model version as a zip a client runs: ``?format=wsinfer`` (``config.json`` +
    ``torchscript_model.pt``, for ``wsinfer run`` and QuPath's WSInfer extension) or ``?format=onnx``
    (``model.onnx`` + the same ``config.json``). Experts and admins; see learner.model_export."""

    roles = EXPERTS
    content_negotiation_class = _FormatIsNotARenderer
    renderer_classes = [JSONRenderer]  # for the errors; the export itself is a streamed zip

    @extend_schema(
        parameters=[
            OpenApiParameter("format", str, enum=list(model_export.FORMATS), description="wsinfer (default) or onnx.")
        ],
        responses={
            (200, "application/zip"): OpenApiTypes.BINARY,
            409: OpenApiResponse(
                ErrorSerializer, description="The version's round did not succeed (failed, cancelled or unfinished)."
            ),
            410: OpenApiResponse(ErrorSerializer, description="The version's weights were pruned or are missing."),
        },
    )
    def get(self, request: Request, project_id: int, version_id: int) -> StreamingHttpResponse | Response:
        project, _ = self.load(request, project_id)
        fmt = request.query_params.get("format", "wsinfer")
        try:
            model_export.check_format(fmt)
            version = model_export.find_version(project, version_id)
            built = model_export.build(version, fmt)
        except model_export.ExportError as exc:
            return Response({"detail": str(exc)}, status=exc.status)
        response = streaming_response(
            request._request, model_export.stream(built), content_type="application/zip", filename=built.filename
        )
        response["X-Model-Version"] = str(version.pk)
        return response
