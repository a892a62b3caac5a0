"""Every URL of the platform. Each module that holds routes is included once, with what it serves."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # slides, tile sources, tiles, thumbnails, regions, patch images
    path("api/v1/", include("annotations.slides.urls")),
    # projects, labels, members, the queue, votes, patches, consensus, reports
    path("api/v1/", include("annotations.urls")),
    # training rounds, heatmaps, predictions
    path("api/v1/", include("learner.urls")),
    # the pages: home, annotator, viewer, dashboard, slide upload
    path("", include("frontend.urls")),
]
