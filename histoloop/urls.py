"""Every URL of the platform. Each module that holds routes is included once, with what it serves."""

from csp.constants import UNSAFE_INLINE
from csp.decorators import csp_update
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.templatetags.static import static
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from histoloop.exceptions import api_not_found

# The Swagger UI page loads its bundle from jsDelivr (drf-spectacular's default) and has a small
# inline <style>; its script comes from this origin (the split view), so script-src stays strict.
SWAGGER_CDN = "https://cdn.jsdelivr.net"
api_docs = csp_update(
    {"script-src": [SWAGGER_CDN], "style-src": [SWAGGER_CDN, UNSAFE_INLINE], "img-src": [SWAGGER_CDN]}
)(SpectacularSwaggerSplitView.as_view(url_name="schema"))


def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico on pages that name no icon (the admin site)."""
    return redirect(static("frontend/favicon.svg"))


urlpatterns = [
    path("favicon.ico", favicon),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", api_docs, name="api-docs"),
    # slides, tile sources, tiles, thumbnails, regions, patch images
    path("api/v1/", include("annotations.slides.urls")),
    # projects, labels, members, the queue, votes, patches, consensus, reports
    path("api/v1/", include("annotations.urls")),
    # training rounds, heatmaps, predictions
    path("api/v1/", include("learner.urls")),
    # anything else under /api/ (a malformed id included) is a JSON 404, not an HTML page
    re_path(r"^api/(?P<path>[\s\S]*)$", api_not_found),  # [\s\S]: an encoded newline in the path too
    # the pages: home, annotator, viewer, dashboard, slide upload
    path("", include("frontend.urls")),
]
