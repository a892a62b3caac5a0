from django.apps import AppConfig


class AnnotationsConfig(AppConfig):
    name = "annotations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from annotations.models import Slide
        from annotations.slides.media import release_deleted_slide

        # A deleted slide row (alone or with its project) takes its files along, once the delete commits.
        post_delete.connect(release_deleted_slide, sender=Slide, dispatch_uid="annotations.slide-media")
