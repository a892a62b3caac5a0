from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from annotations import slide_urls

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("annotations.slide_urls")),
    path("api/v1/", include("annotations.urls")),
    path("api/v1/", include("learner.urls")),
    path("", include(slide_urls.page_urlpatterns)),
    path("", include("frontend.urls")),
]
