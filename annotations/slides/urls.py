"""Slides, tiles, thumbnails, regions and patch images, mounted under /api/v1/.

``page_urlpatterns`` holds the browser upload page, which belongs outside /api/v1/: mount it with
``path("", include(annotations.slide_urls.page_urlpatterns))`` in histoloop/urls.py.
"""

from django.urls import path

from . import slide_views

urlpatterns = [
    path("projects/<int:project_id>/slides/", slide_views.SlideListView.as_view(), name="slide-list"),
    path("slides/<int:slide_id>/", slide_views.SlideDetailView.as_view(), name="slide-detail"),
    path("slides/<int:slide_id>/tilesource", slide_views.TileSourceView.as_view(), name="slide-tilesource"),
    path("slides/<int:slide_id>/tiles/<int:z>/<int:x>/<int:y>.jpeg", slide_views.tile, name="slide-tile"),
    path("slides/<int:slide_id>/thumbnail.jpeg", slide_views.thumbnail, name="slide-thumbnail"),
    path("slides/<int:slide_id>/region.jpeg", slide_views.region, name="slide-region"),
    path("patches/<int:patch_id>/image.jpeg", slide_views.patch_image, name="patch-image"),
]

page_urlpatterns = [
    path("projects/<int:project_id>/slides/upload/", slide_views.slide_upload_page, name="slide-upload-page"),
]
