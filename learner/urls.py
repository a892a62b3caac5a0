from django.urls import path

from . import api, api_labelling, api_map

urlpatterns = [
    path("projects/<int:project_id>/rounds/", api.RoundListView.as_view(), name="round-list"),
    path("projects/<int:project_id>/rounds/<int:round_id>/cancel/", api.RoundCancelView.as_view(), name="round-cancel"),
    path(
        "projects/<int:project_id>/models/<int:version_id>/export/",
        api.ModelExportView.as_view(),
        name="model-export",
    ),
    path("projects/<int:project_id>/map/", api_map.EmbeddingMapView.as_view(), name="embedding-map"),
    path("projects/<int:project_id>/heatmap/", api.HeatmapView.as_view(), name="heatmap"),
    path(
        "projects/<int:project_id>/patches/<int:patch_id>/prediction/", api.PredictionView.as_view(), name="prediction"
    ),
    path("projects/<int:project_id>/patches/<int:patch_id>/gradcam.png", api.GradCamView.as_view(), name="gradcam"),
    path(
        "projects/<int:project_id>/patches/<int:patch_id>/similar/", api_labelling.SimilarView.as_view(), name="similar"
    ),
    path(
        "projects/<int:project_id>/patches/<int:patch_id>/similar/label/",
        api_labelling.SimilarLabelView.as_view(),
        name="similar-label",
    ),
    path("projects/<int:project_id>/suggestions/", api_labelling.SuggestionStripView.as_view(), name="suggestions"),
    path(
        "projects/<int:project_id>/suggestions/accept/",
        api_labelling.SuggestionAcceptView.as_view(),
        name="suggestions-accept",
    ),
]
