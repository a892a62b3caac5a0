"""The slide endpoints: upload (REST and the browser page), listing, detail, the tile source and
the image endpoints (tiles, thumbnail, region, patch image). Routes: :mod:`annotations.slides.urls`
(under /api/v1/) and frontend/urls.py (the upload page).

The image endpoints are plain async Django views rather than DRF views: a viewer asks for dozens
of tiles per second, so they avoid DRF's per-request machinery and, after the first request of a
credential for a slide, the database too (see :mod:`annotations.slides.access`). Pixel work runs
in a thread so the event loop keeps serving. Once a credential is authorised for a slide, its tile
requests are answered in front of Django by :mod:`annotations.slides.lean` (the middleware stack
alone costs ~3 ms a request under ASGI: every MiddlewareMixin hook is a hop to a thread); ``tile``
here serves the first request of each credential, and every request where the lean route is off.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile, StopFutureHandlers, StopUpload
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from django.http.request import QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.utils.datastructures import MultiValueDict
from django.utils.http import parse_etags
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_safe
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotations.models import Patch, Role, Slide
from annotations.permissions import project_for

from . import ingest, tiles
from .access import Refused, SlideAccess, authorise, patch_for, slide_access
from .serializers import SlideSerializer

CACHE_CONTROL = "private, max-age=31536000, immutable"
DEFAULT_REGION_SIZE = 1024
# Multipart framing and small form fields on top of the file itself.
UPLOAD_OVERHEAD_BYTES = 1024 * 1024


# Uploads: stream the "file" field straight into an IncomingFile, counting and hashing as it comes.


class IncomingUpload(UploadedFile):
    """request.FILES["file"]: the IncomingFile already on disk under MEDIA_ROOT/incoming/."""

    def __init__(self, incoming: ingest.IncomingFile, content_type: str | None) -> None:
        super().__init__(file=None, name=incoming.name, content_type=content_type, size=incoming.size)
        self.incoming = incoming

    def close(self) -> None:
        # Django closes uploaded files at the end of the request: an upload nobody kept is deleted.
        self.incoming.discard()


class SlideUploadHandler(FileUploadHandler):
    """Accepts one file field, ``file``; records a SlideRejected on ``request.slide_upload_error``."""

    def __init__(self, request: HttpRequest) -> None:
        super().__init__(request)
        self.incoming: ingest.IncomingFile | None = None

    def _reject(self, error: ingest.SlideRejected) -> None:
        self.request.slide_upload_error = error  # type: ignore[union-attr]
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    def handle_raw_input(  # type: ignore[no-untyped-def]
        self, input_data: Any, META: dict, content_length: int, boundary: Any, encoding: Any = None
    ):
        if content_length and content_length > settings.MAX_UPLOAD_BYTES + UPLOAD_OVERHEAD_BYTES:
            self._reject(ingest.too_large())
            return QueryDict(), MultiValueDict()  # refuse without reading the body
        return None

    def new_file(self, field_name: str, file_name: str, *args: Any, **kwargs: Any) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if field_name != "file" or self.incoming is not None:
            raise SkipFile()
        try:
            self.incoming = ingest.IncomingFile(file_name)
        except ingest.SlideRejected as exc:
            self._reject(exc)
            raise SkipFile() from exc
        raise StopFutureHandlers()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        if self.incoming is None:
            return None
        try:
            self.incoming.write(raw_data)
        except ingest.SlideRejected as exc:
            self.incoming = None  # write() already deleted it
            self._reject(exc)
            raise StopUpload(connection_reset=False) from exc
        return None

    def file_complete(self, file_size: int) -> IncomingUpload | None:
        if self.incoming is None:
            return None
        self.incoming.close()
        return IncomingUpload(self.incoming, self.content_type)

    def upload_interrupted(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()


def receive_upload(request: HttpRequest | Request, project: Any, user: Any) -> Slide:
    """The shared tail of the API and page uploads; SlideRejected on bad input."""
    upload = request.FILES.get("file")
    error = getattr(request, "slide_upload_error", None)
    if error is not None:
        if isinstance(upload, IncomingUpload):
            upload.incoming.discard()
        raise error
    if upload is None:
        raise ingest.SlideRejected("Choose a slide file to upload (form field 'file').", code="missing")
    if isinstance(upload, IncomingUpload):
        incoming = upload.incoming
    else:  # another upload handler ran (e.g. a test client setting its own): copy it in chunks
        incoming = ingest.IncomingFile(upload.name or "")
        try:
            incoming.write_all(upload.chunks())
        except BaseException:
            incoming.discard()
            raise
    group = str(request.POST.get("group", "") if isinstance(request, HttpRequest) else request.data.get("group", ""))
    return ingest.add_slide(project, incoming, user=user, group=group)


def _rejected(exc: ingest.SlideRejected) -> Response:
    return Response({"detail": exc.message, "code": exc.code}, status=exc.status)


class SlideListView(GenericAPIView):
    """GET: the project's slides (members). POST multipart ``file`` (+ optional ``group``): add one (admins)."""

    serializer_class = SlideSerializer

    def initialize_request(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Request:
        if request.method == "POST":
            request.upload_handlers = [SlideUploadHandler(request)]
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = project_for(request.user, project_id)
        queryset = project.slides.annotate(patch_count=Count("patches")).order_by("id")
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(SlideSerializer(page, many=True).data)

    @extend_schema(
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}, "group": {"type": "string"}},
                "required": ["file"],
            }
        },
        responses={201: SlideSerializer},
    )
    def post(self, request: Request, project_id: int) -> Response:
        project, _ = project_for(request.user, project_id, roles=(Role.ADMIN,))
        try:
            slide = receive_upload(request, project, request.user)
        except ingest.SlideRejected as exc:
            return _rejected(exc)
        return Response(SlideSerializer(slide).data, status=201)


class SlideDetailView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, slide_id: int) -> Response:
        slide = Slide.objects.filter(pk=slide_id).first()
        if slide is None:
            raise Http404("No such slide.")
        project_for(request.user, slide.project_id)
        return Response(SlideSerializer(slide).data)


class TileSourceView(APIView):
    """What an OpenSeadragon custom tile source needs; see annotations.slides.tiles for the scheme."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, slide_id: int) -> Response:
        access = slide_access(request.user, slide_id)
        try:
            info = tiles.tilesource_info(access.path)
        except tiles.SlideReadError as exc:
            raise Http404(str(exc)) from exc
        slide = Slide.objects.only("name", "mpp", "magnification").get(pk=slide_id)
        base = reverse("slide-detail", kwargs={"slide_id": slide_id})
        info.update(
            id=slide_id,
            name=slide.name,
            mpp=slide.mpp,
            magnification=slide.magnification,
            tileUrlTemplate=base + "tiles/{z}/{x}/{y}.jpeg",
            thumbnailUrl=base + "thumbnail.jpeg",
            regionUrl=base + "region.jpeg",
        )
        return Response(info)


# Image endpoints.


def _not_modified(request: HttpRequest, tag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = parse_etags(header)
    # If-None-Match uses the weak comparison: W/"x" matches "x".
    return "*" in tags or tag in tags or f"W/{tag}" in tags


def _image(data: bytes, tag: str) -> HttpResponse:
    response = HttpResponse(data, content_type="image/jpeg")
    response["ETag"] = tag
    response["Cache-Control"] = CACHE_CONTROL
    return response


def _unchanged(tag: str) -> HttpResponse:
    response = HttpResponseNotModified()
    response["ETag"] = tag
    response["Cache-Control"] = CACHE_CONTROL
    return response


def _bad_request(detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=400)


async def _serve(
    request: HttpRequest, tag: str, render_image: Callable[[], bytes], *, missing_status: int = 404
) -> HttpResponse:
    if _not_modified(request, tag):
        return _unchanged(tag)
    try:
        data = await asyncio.to_thread(render_image)
    except tiles.TileNotFound as exc:
        return JsonResponse({"detail": str(exc)}, status=missing_status)
    except tiles.SlideReadError as exc:
        return JsonResponse({"detail": str(exc)}, status=404)
    return _image(data, tag)


def _guarded(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Awaitable[HttpResponse]]:
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return await view(request, *args, **kwargs)
        except Refused as exc:
            return exc.response

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return require_safe(wrapper)


@_guarded
async def tile(request: HttpRequest, slide_id: int, z: int, x: int, y: int) -> HttpResponse:
    access: SlideAccess = await authorise(request, "slide", slide_id, slide_access)
    tag = tiles.etag(access.checksum, "tile", z, x, y)
    return await _serve(request, tag, lambda: tiles.tile_jpeg(access.path, z, x, y, access.checksum))


@_guarded
async def thumbnail(request: HttpRequest, slide_id: int) -> HttpResponse:
    access: SlideAccess = await authorise(request, "slide", slide_id, slide_access)
    tag = tiles.etag(access.checksum, "thumbnail", tiles.THUMBNAIL_SIZE)

    def render_thumbnail() -> bytes:
        # The row's stored thumbnail; rendered from the slide while there is none yet, or when a
        # re-run renamed it after this credential's access was cached.
        if access.thumbnail:
            try:
                return Path(access.thumbnail).read_bytes()
            except FileNotFoundError:
                pass
        return tiles.thumbnail_jpeg(access.path, tiles.THUMBNAIL_SIZE)

    return await _serve(request, tag, render_thumbnail)


def _int_param(request: HttpRequest, name: str, *, default: int | None = None, low: int, high: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"The '{name}' parameter is required (level-0 pixels).")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"The '{name}' parameter must be a whole number, not '{raw[:20]}'.") from None
    if not low <= value <= high:
        raise ValueError(f"The '{name}' parameter must be between {low} and {high}.")
    return value


@_guarded
async def region(request: HttpRequest, slide_id: int) -> HttpResponse:
    """``?left=&top=&width=&height=`` in level-0 pixels, ``max_size`` (1-4096, default 1024) in output pixels."""
    access: SlideAccess = await authorise(request, "slide", slide_id, slide_access)
    limit = 10**7
    try:
        left = _int_param(request, "left", low=0, high=limit)
        top = _int_param(request, "top", low=0, high=limit)
        width = _int_param(request, "width", low=1, high=limit)
        height = _int_param(request, "height", low=1, high=limit)
        max_size = _int_param(request, "max_size", default=DEFAULT_REGION_SIZE, low=1, high=tiles.MAX_REGION_SIZE)
    except ValueError as exc:
        return _bad_request(str(exc))
    tag = tiles.etag(access.checksum, "region", left, top, width, height, max_size)
    render_region = lambda: tiles.region_jpeg(access.path, left, top, width, height, max_size)  # noqa: E731
    return await _serve(request, tag, render_region, missing_status=400)


@_guarded
async def patch_image(request: HttpRequest, patch_id: int) -> HttpResponse:
    """The patch at the project's patch_size; ``?context=`` adds a margin (fraction of the patch if < 1, else px)."""
    patch: Patch = await authorise(request, "patch", patch_id, patch_for)
    raw = request.GET.get("context", "0") or "0"
    limit = 2 * patch.project.patch_size
    try:
        context = float(raw)
        # float() takes "inf", "1e400" and 400-digit numbers as infinity: too large, like any huge margin.
        if context == math.inf:
            return _bad_request(f"The 'context' margin may be at most {limit} px.")
        margin = tiles.context_margin(context, patch.project.patch_size)
    except ValueError:  # not a number, "nan", negative or "-inf"
        return _bad_request("The 'context' parameter must be a number: a fraction of the patch below 1, or pixels.")
    if margin > limit:
        return _bad_request(f"The 'context' margin may be at most {limit} px.")
    tag = tiles.etag(patch.slide.checksum, "patch", patch.x, patch.y, patch.size, patch.project.patch_size, margin)
    return await _serve(request, tag, lambda: tiles.patch_jpeg(patch, margin))


# The browser upload page (not under /api/v1/: its route is in frontend/urls.py, with the other pages).


@csrf_exempt
def slide_upload_page(request: HttpRequest, project_id: int) -> HttpResponse:
    # The upload handler must be in place before anything (the CSRF check included) reads the body.
    if request.method == "POST":
        request.upload_handlers = [SlideUploadHandler(request)]
    return _slide_upload_page(request, project_id)


@csrf_protect
@login_required
def _slide_upload_page(request: HttpRequest, project_id: int) -> HttpResponse:
    try:
        project, _ = project_for(request.user, project_id, roles=(Role.ADMIN,))
    except PermissionDenied as exc:
        return HttpResponse(str(exc.detail), status=403, content_type="text/plain; charset=utf-8")
    context: dict[str, Any] = {
        "project": project,
        "api_url": reverse("slide-list", kwargs={"project_id": project.pk}),
        "max_upload": ingest.human_bytes(settings.MAX_UPLOAD_BYTES),
        "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
        "formats": ingest.supported_formats(),
        "accept": ",".join(ingest.SUPPORTED_EXTENSIONS),
        "slides": project.slides.order_by("-id")[:50],
    }
    status = 200
    if request.method == "POST":
        try:
            slide = receive_upload(request, project, request.user)
        except ingest.SlideRejected as exc:
            context["error"] = exc.message
            status = exc.status
        else:
            context["added"] = slide
            status = 201
    return render(request, "annotations/slide_upload.html", context, status=status)
