"""Views over a project's labels as a whole: the slide overlay, the agreement report, batch consensus,
label export and import."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from . import agreement, consensus, label_files, regions, speed, students, training_set
from .api import ADMIN_ONLY, EXPERTS, ProjectScoped, query_id
from .models import Consensus, Membership, Patch, Role, Slide, Vote
from .serializers import (
    LabelImportInputSerializer,
    LabelImportResultSerializer,
    OverlaySerializer,
    RegionImportInputSerializer,
    RegionImportResultSerializer,
)
from .zip_stream import streaming_response

# The slide's patches in id order, each with its consensus label and status where the caller may see one
# (a crowd member: only on the patches they have an active vote on). One pass over the slide's patches, the
# consensus joined by its unique patch id, and each field comes back as one array: 50,000 patches are seven
# lists of plain values, not 50,000 row tuples for the garbage collector to walk (which made every other
# request on a 50,000-patch slide twice as slow).
_OVERLAY_SQL = f"""
SELECT array_agg(id), array_agg(x), array_agg(y), array_agg(size), array_agg(is_gold), array_agg(label_id),
       array_agg(status)
FROM (
  SELECT p.id, p.x, p.y, p.size, p.is_gold, c.label_id, c.status
  FROM {Patch._meta.db_table} p
  LEFT JOIN {Consensus._meta.db_table} c
    ON c.patch_id = p.id AND c.project_id = p.project_id AND c.label_id IS NOT NULL
    AND (NOT %(crowd)s OR EXISTS (
      SELECT 1 FROM {Vote._meta.db_table} v
      WHERE v.patch_id = p.id AND v.annotator_id = %(user)s AND v.is_active
    ))
  WHERE p.project_id = %(project)s AND p.slide_id = %(slide)s
  ORDER BY p.id
) AS slide_patches
"""


class OverlayView(ProjectScoped):
    """The patch grid of one slide with consensus labels (crowd: only patches they voted on).

    Columnar, so a slide of 50,000 patches is a few hundred kilobytes, not 50,000 JSON objects: one
    array per field, ``label`` and ``status`` as indexes into ``labels`` and ``statuses`` (null when
    the patch has no consensus label the caller may see).
    """

    write_roles = None

    @extend_schema(
        parameters=[OpenApiParameter("slide", OpenApiTypes.INT, required=True, description="The slide's id.")],
        responses=OverlaySerializer,
    )
    def get(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        slide_id = query_id(request, "slide")
        if slide_id is None:
            return Response({"detail": "Give the slide id as ?slide=<id>."}, status=400)
        label_rows = list(project.label_classes.order_by("order").values_list("pk", "name", "colour"))
        label_index = {pk: i for i, (pk, _, _) in enumerate(label_rows)}
        statuses = list(Consensus.Status.values)
        status_index = {status: i for i, status in enumerate(statuses)}
        crowd = role == Role.CROWD
        with connection.cursor() as cursor:
            cursor.execute(
                _OVERLAY_SQL, {"project": project.pk, "slide": slide_id, "crowd": crowd, "user": request.user.pk}
            )
            fields = [list(values or ()) for values in cursor.fetchone()]
        if fields[0] != sorted(fields[0]):
            # PostgreSQL aggregates a sorted subquery in its order; should a plan ever not, sort here
            order = sorted(range(len(fields[0])), key=fields[0].__getitem__)
            fields = [[column[i] for i in order] for column in fields]
        ids, xs, ys, sizes, golds, label_ids, shown_statuses = fields
        labels = [label_index.get(pk) for pk in label_ids]
        columns: dict[str, list[Any]] = {
            "id": ids,
            "x": xs,
            "y": ys,
            "size": sizes,
            "label": labels,
            "status": [None if i is None else status_index[s] for i, s in zip(labels, shown_statuses, strict=True)],
            "is_gold": [False] * len(ids) if crowd else golds,
        }
        return Response(
            {
                "slide": slide_id,
                "count": len(columns["id"]),
                "labels": [name for _, name, _ in label_rows],
                "colours": [colour for _, _, colour in label_rows],
                "statuses": statuses,
                "patches": columns,
            }
        )


class AgreementView(ProjectScoped):
    """The agreement report (annotations.agreement.cached_report): 200 with the report, 202 while the first
    report of a large project is being computed on the worker (ask again in a few seconds), 503 when that
    first report cannot be queued (the broker is down)."""

    roles = EXPERTS

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 202: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT})
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        try:
            report = agreement.cached_report(project)
        except agreement.ReportUnavailable as exc:
            return Response({"detail": str(exc)}, status=503)
        if report is None:
            return Response(
                {
                    "detail": "The agreement report of this project is being computed on the worker; "
                    "ask again in a few seconds.",
                    "refreshing": True,
                },
                status=202,
            )
        return Response(report)


def _block(request: Request) -> int | None:
    """``?block=`` (answers per point of a learning curve), or None when it is not a whole number in range."""
    raw = request.query_params.get("block", str(students.DEFAULT_BLOCK))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4):
        return None
    value = int(raw)
    return value if students.MIN_BLOCK <= value <= students.MAX_BLOCK else None


BLOCK_ERROR = f"Give block as a whole number of answers from {students.MIN_BLOCK} to {students.MAX_BLOCK}."


class StudentsView(ProjectScoped):
    """The crowd members with their gold answers, accuracy, gold rate and whether they are certified
    (annotations.students). Experts and admins, like the agreement report."""

    roles = EXPERTS

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        return Response(students.students(project))


class StudentCurveView(ProjectScoped):
    """One member's learning curve: gold accuracy and Cohen's kappa against the experts, block by block of
    their answers. Experts and admins; a crowd member reads their own at ``my-progress/``."""

    roles = EXPERTS

    @extend_schema(
        parameters=[OpenApiParameter("block", OpenApiTypes.INT, description="Answers per point, default 25.")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request, project_id: int, user_id: int) -> Response:
        project, _ = self.load(request, project_id)
        block = _block(request)
        if block is None:
            return Response({"detail": BLOCK_ERROR}, status=400)
        membership = Membership.objects.filter(project=project, user_id=user_id).select_related("user").first()
        if membership is None:
            return Response({"detail": "No such member in this project."}, status=404)
        body = students.learning_curve(project, membership.user_id, block)
        body["student"] = students.student_summary(project, membership)
        return Response(body)


class MyProgressView(ProjectScoped):
    """The caller's own learning curve. A crowd member sees it only in training mode: block by block, the
    number of gold answers would tell them which of their tasks were gold checks, which training mode
    shows anyway and blind checks must not."""

    write_roles = None

    @extend_schema(
        parameters=[OpenApiParameter("block", OpenApiTypes.INT, description="Answers per point, default 25.")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        if role == Role.CROWD and not project.training_mode:
            return Response(
                {"detail": "Your progress is shown in training mode only; this project is not in training mode."},
                status=403,
            )
        block = _block(request)
        if block is None:
            return Response({"detail": BLOCK_ERROR}, status=400)
        body = students.learning_curve(project, request.user.pk, block)
        membership = Membership.objects.filter(project=project, user=request.user).select_related("user").first()
        if membership is not None:
            summary = students.student_summary(project, membership)
            body["me"] = {key: summary[key] for key in ("gold_answers", "gold_correct", "gold_accuracy", "certified")}
        return Response(body)


class LabellingSpeedView(ProjectScoped):
    """Labels per hour per annotator and per mode over the last ``days`` days (annotations.speed), and how the
    labels the latest model trained on were made (recorded by its round at the snapshot)."""

    roles = EXPERTS

    @extend_schema(
        parameters=[OpenApiParameter("days", OpenApiTypes.INT, description=f"1-{speed.MAX_DAYS}, default 30.")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        raw = request.query_params.get("days", "30")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= speed.MAX_DAYS):
            return Response({"detail": f"Give days as a whole number from 1 to {speed.MAX_DAYS}."}, status=400)
        body = dict(speed.cached_labelling_speed(project, int(raw)))
        from learner.models import ModelVersion

        version = ModelVersion.objects.filter(project=project).select_related("round").order_by("-created_at").first()
        trained = None
        if version is not None:
            counts = (version.round.metrics or {}).get("label_provenance")
            trained = {
                "model_version": version.pk,
                "round": version.round.number,
                "n_labels": version.n_labels,
                # None for a round from before modes were recorded at the snapshot.
                "votes": counts,
                "shares": speed.shares(counts) if counts is not None else None,
            }
        body["latest_model"] = trained
        return Response(body)


class RecomputeConsensusView(ProjectScoped):
    roles = ADMIN_ONLY

    @extend_schema(responses=OpenApiTypes.OBJECT, request=None)
    def post(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        return Response(
            {"recomputed": consensus.recompute_project_consensus(project), "method": project.consensus_method}
        )


class ExportView(ProjectScoped):
    """``?format=csv|json|geojson&kind=votes|consensus[&slide=<id>]``. Experts and admins only."""

    roles = EXPERTS

    @extend_schema(
        parameters=[
            OpenApiParameter("format", str, enum=["csv", "json", "geojson"], description="Default csv."),
            OpenApiParameter("kind", str, enum=["votes", "consensus"], description="Default consensus."),
            OpenApiParameter("slide", OpenApiTypes.INT, description="Consensus of one slide only."),
        ],
        responses={
            (200, "text/csv"): OpenApiTypes.STR,
            (200, "application/json"): {"type": "array", "items": {"type": "object"}},
            (200, "application/geo+json"): OpenApiTypes.OBJECT,
        },
    )
    def get(self, request: Request, project_id: int) -> HttpResponse:
        project, _ = self.load(request, project_id)
        fmt = request.query_params.get("format", "csv")
        kind = request.query_params.get("kind", "consensus")
        slide_id = query_id(request, "slide")
        if fmt not in {"csv", "json", "geojson"} or kind not in {"votes", "consensus"}:
            return Response({"detail": "Use format=csv|json|geojson and kind=votes|consensus."}, status=400)
        if fmt == "geojson" and kind != "consensus":
            return Response({"detail": "GeoJSON exports consensus labels; use kind=consensus."}, status=400)
        rows: Any = label_files.vote_rows(project) if kind == "votes" else label_files.consensus_rows(project, slide_id)
        stem = f"project-{project.pk}-{kind}"
        if fmt == "csv":
            fields = label_files.VOTE_FIELDS if kind == "votes" else label_files.CONSENSUS_FIELDS
            response = HttpResponse(label_files.to_csv(rows, fields), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="{stem}.csv"'
        elif fmt == "json":
            response = HttpResponse(json.dumps(list(rows)), content_type="application/json")
            response["Content-Disposition"] = f'attachment; filename="{stem}.json"'
        else:
            response = HttpResponse(json.dumps(label_files.to_geojson(rows)), content_type="application/geo+json")
            response["Content-Disposition"] = f'attachment; filename="{stem}.geojson"'
        return response


class TrainingSetView(ProjectScoped):
    """The labelled patches as a zip (``class/group/patch.png`` + ``manifest.csv``), streamed as it is
    made: see annotations.training_set. Experts and admins only."""

    roles = EXPERTS

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "status",
                str,
                description="Comma-separated consensus statuses to include (default agreed,expert: what rounds "
                f"train on); any of {', '.join(training_set.STATUSES)}.",
            )
        ],
        responses={(200, "application/zip"): OpenApiTypes.BINARY},
    )
    def get(self, request: Request, project_id: int) -> StreamingHttpResponse | Response:
        project, _ = self.load(request, project_id)
        raw = request.query_params.get("status")
        statuses = training_set.FINAL_STATUSES if raw is None else [s.strip() for s in raw.split(",") if s.strip()]
        try:
            training_set.check_statuses(statuses)
        except training_set.TrainingSetError as exc:
            return Response({"detail": str(exc)}, status=400)
        response = streaming_response(
            request._request,
            training_set.stream(project, statuses),
            content_type="application/zip",
            filename=f"project-{project.pk}-training-set.zip",
        )
        response["X-Patch-Count"] = str(training_set.count(project, statuses))
        return response


class ImportLabelsView(ProjectScoped):
    """Upload a QuPath GeoJSON or a CSV (slide,x,y,label); rows become the uploader's expert votes."""

    write_roles = EXPERTS
    parser_classes = [MultiPartParser]

    @extend_schema(request=LabelImportInputSerializer, responses={201: LabelImportResultSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        upload = request.FILES.get("file")
        if upload is None:
            return Response({"detail": "Attach the label file as 'file'."}, status=400)
        if upload.size > settings.MAX_IMPORT_BYTES:
            limit = settings.MAX_IMPORT_BYTES // 1024**2
            return Response({"detail": f"Label files over {limit} MB are not accepted; split the file."}, status=413)
        try:
            rows = label_files.parse_labels(upload.read(), upload.name, request.data.get("slide"))
            result = label_files.import_expert_labels(project, request.user, role, rows)
        except (label_files.LabelFileError, UnicodeDecodeError) as exc:
            return Response(
                {"detail": str(exc) if isinstance(exc, label_files.LabelFileError) else "The file is not UTF-8 text."},
                status=400,
            )
        return Response(result, status=201)


class ImportRegionsView(ProjectScoped):
    """Upload QuPath GeoJSON region annotations of one slide; every patch a region of one class covers
    by at least ``min_coverage`` gets that class as the uploader's expert vote (see annotations.regions)."""

    write_roles = EXPERTS
    parser_classes = [MultiPartParser]

    @extend_schema(request=RegionImportInputSerializer, responses={201: RegionImportResultSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        form = RegionImportInputSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        upload = form.validated_data["file"]
        if upload.size > settings.MAX_IMPORT_BYTES:
            limit = settings.MAX_IMPORT_BYTES // 1024**2
            return Response({"detail": f"Region files over {limit} MB are not accepted; split the file."}, status=413)
        slide = Slide.objects.filter(project=project, pk=form.validated_data["slide"]).first()
        if slide is None:
            return Response({"detail": "No slide with that id in this project."}, status=400)
        try:
            result = regions.import_regions(
                project, request.user, role, slide, upload.read(), form.validated_data["min_coverage"]
            )
        except label_files.LabelFileError as exc:
            return Response({"detail": str(exc)}, status=400)
        return Response(result, status=201)
