"""Read-only representations of slides (uploads are multipart and go through annotations.slides.ingest)."""

from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from annotations.models import Slide


class SlideSerializer(serializers.ModelSerializer):
    patch_count = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()
    tilesource_url = serializers.SerializerMethodField()

    class Meta:
        model = Slide
        fields = [
            "id", "project", "name", "format", "status", "error", "message", "width", "height", "levels",
            "mpp", "magnification", "checksum", "size_bytes", "group", "created_at", "patch_count",
            "thumbnail_url", "tilesource_url",
        ]  # fmt: skip
        read_only_fields = fields

    def get_patch_count(self, slide: Slide) -> int | None:
        # Annotated on list querysets (one query for the page); counted for a single slide.
        count = getattr(slide, "patch_count", None)
        return count if count is not None else slide.patches.count()

    def get_thumbnail_url(self, slide: Slide) -> str | None:
        if not slide.thumbnail:
            return None
        return reverse("slide-thumbnail", kwargs={"slide_id": slide.pk})

    def get_tilesource_url(self, slide: Slide) -> str | None:
        if slide.status == Slide.Status.FAILED:
            return None
        return reverse("slide-tilesource", kwargs={"slide_id": slide.pk})
