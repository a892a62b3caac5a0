"""The slide API, mounted under /api/v1/ by histoloop/urls.py: slides, tile sources, tiles, thumbnails,
regions and patch images. The browser upload page (/projects/<id>/slides/upload/) is a page, so its
route is in frontend/urls.py."""

from django.urls import path

from . import views

urlpatterns = [
    path("projects/<int:project_id>/slides/", views.SlideListView.as_view(), name="slide-list"),
    path("slides/<int:slide_id>/", views.SlideDetailView.as_view(), name="slide-detail"),
    path("slides/<int:slide_id>/tilesource", views.TileSourceView.as_view(), name="slide-tilesource"),
    path("slides/<int:slide_id>/tiles/<int:z>/<int:x>/<int:y>.jpeg", views.tile, name="slide-tile"),
    path("slides/<int:slide_id>/thumbnail.jpeg", views.thumbnail, name="slide-thumbnail"),
    path("slides/<int:slide_id>/region.jpeg", views.region, name="slide-region"),
    path("patches/<int:patch_id>/image.jpeg", views.patch_image, name="patch-image"),
]
