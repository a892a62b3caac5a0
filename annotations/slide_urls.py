"""Slides, tiles, thumbnails, regions and patch images (owned by the slide/tile code)."""

from django.urls import path

urlpatterns: list = []
