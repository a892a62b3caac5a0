from django.apps import AppConfig


class LearnerConfig(AppConfig):
    name = "learner"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # A slide made ready by ingest gets its embedding queued in the background (learner.background).
        from annotations.slides.ingest import slide_ready

        from .background import on_slide_ready

        slide_ready.connect(on_slide_ready, dispatch_uid="learner.background_embedding")
