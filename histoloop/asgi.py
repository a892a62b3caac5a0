"""ASGI entry point: HTTP through Django (tiles of already-authorised viewers, and the annotator's
next-task and vote, through the lean routes in front of it: annotations.slides.lean and
annotations.lean_queue), websockets through Channels (session-authenticated)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "histoloop.settings")

from histoloop.asgi_handler import get_application

# Django's synchronous middleware chain with one thread hop per request (histoloop.asgi_handler).
django_asgi_app = get_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from annotations.lean_queue import LeanQueue  # noqa: E402
from annotations.routing import websocket_urlpatterns  # noqa: E402
from annotations.slides.lean import LeanTiles  # noqa: E402
from histoloop import body_limit  # noqa: E402


def _warm_up() -> None:
    """Import the heavy libraries behind reports, and the URL configuration, now, not inside the first request
    that needs them (sync views share one thread per server process, so a cold import would stall every other
    request)."""
    import crowdkit.aggregation  # noqa: F401
    import krippendorff  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import statsmodels.stats.inter_rater  # noqa: F401
    from django.urls import get_resolver

    # Every route module and the views behind it (the learner's import torch): Django loads them at the first
    # request otherwise, which then takes seconds (the first annotator of each server process waited).
    get_resolver().url_patterns  # noqa: B018


_warm_up()


def _lean(app):  # type: ignore[no-untyped-def]
    inner = LeanTiles(app) if settings.LEAN_TILE_ROUTE else app
    return LeanQueue(inner, threads=app) if settings.LEAN_QUEUE_ROUTE else inner


application = ProtocolTypeRouter(
    {
        # Body limits outside Django: its handler reads the whole body before any middleware runs.
        # Inside them, tiles for credentials Django already authorised are answered before Django
        # (see annotations/slides/lean.py).
        # The annotator's next-task and vote likewise (annotations/lean_queue.py).
        "http": body_limit.from_settings(_lean(django_asgi_app)),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
