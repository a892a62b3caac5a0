from django.urls import path

from annotations.slides import views as slide_views

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("projects/<int:project_id>/annotate/", views.annotate, name="annotate"),
    path("projects/<int:project_id>/viewer/", views.viewer, name="viewer"),
    path("projects/<int:project_id>/viewer/<int:slide_id>/", views.viewer, name="viewer-slide"),
    path("projects/<int:project_id>/strip/", views.strip, name="strip"),
    path("projects/<int:project_id>/dashboard/", views.dashboard, name="dashboard"),
    path("projects/<int:project_id>/map/", views.embedding_map, name="embedding-map-page"),
    # The upload view shares its streaming upload handler with the slide API, so it lives beside it.
    path("projects/<int:project_id>/slides/upload/", slide_views.slide_upload_page, name="slide-upload-page"),
]
