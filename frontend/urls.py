from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("projects/<int:project_id>/annotate/", views.annotate, name="annotate"),
    path("projects/<int:project_id>/viewer/", views.viewer, name="viewer"),
    path("projects/<int:project_id>/viewer/<int:slide_id>/", views.viewer, name="viewer-slide"),
    path("projects/<int:project_id>/dashboard/", views.dashboard, name="dashboard"),
]
