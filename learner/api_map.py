"""REST API of the embedding map: the binary map (experts and admins) and an admin's request to lay it out."""

from __future__ import annotations

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from annotations.api import EXPERTS, ProjectScoped

from . import maps


class MapQueuedSerializer(serializers.Serializer):
    task = serializers.CharField(help_text="The Celery task id of the layout.")
    detail = serializers.CharField()


class MapInputSerializer(serializers.Serializer):
    force = serializers.BooleanField(
        required=False, default=False, help_text="Lay it out again even when the stored map is of the same pool."
    )


class EmbeddingMapView(ProjectScoped):
    """The project's pool on a 2-D map. Experts and admins only: its colours show consensus and the model's
    predictions, which a crowd member labelling blind must not see."""

    roles = EXPERTS
    write_roles = ("admin",)

    @extend_schema(
        responses={(200, maps.CONTENT_TYPE): OpenApiTypes.BINARY, 404: OpenApiTypes.OBJECT},
        description="The binary map (format in learner/maps.py): a JSON header, patch ids, float32 x/y in "
        "[-1, 1] and uint8/uint16 colour channels (consensus, prediction, uncertainty bucket, slide).",
    )
    def get(self, request: Request, project_id: int) -> HttpResponse:
        project, _ = self.load(request, project_id)
        stored = maps.latest(project)
        if stored is None:
            return Response(
                {"detail": "This project has no map yet: a round lays one out, or an admin can ask for one."},
                status=status.HTTP_404_NOT_FOUND,
            )
        response = HttpResponse(maps.payload(project, stored), content_type=maps.CONTENT_TYPE)
        response["Cache-Control"] = "private, no-cache"
        return response

    @extend_schema(request=MapInputSerializer, responses={202: MapQueuedSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        from .tasks import compute_embedding_map

        project, _ = self.load(request, project_id)
        data = MapInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = compute_embedding_map.delay(project.pk, data.validated_data["force"])
        body = {"task": result.id, "detail": "The map is being laid out on the worker; reload it when it is done."}
        return Response(body, status=status.HTTP_202_ACCEPTED)
