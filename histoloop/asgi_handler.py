"""Django's ASGI handler with one thread hop per request instead of about fifteen.

Why: every middleware and every API view of this project is synchronous. Django's own ASGI handler
builds an *async* middleware chain, so each ``MiddlewareMixin`` middleware runs its
``process_request`` and ``process_response`` through ``sync_to_async`` (one hop into a thread and
back each), WhiteNoise (sync only) hops back to the event loop with ``async_to_sync`` for the rest
of the chain, the view hops into a thread again, the request_started/finished signals hop too, and
every request starts a fresh thread (``ThreadSensitiveContext``). Profiled on the annotator's hot
path (next-task + vote, README), that switching cost more CPU than the view itself.

:class:`OneHopASGIHandler` builds the *synchronous* chain (the one Django's WSGI handler uses: the
same middleware, in the same order, with the same answers) and runs the whole request, signals
included, as one call in a fixed pool of threads, the way a WSGI server would; reading the body and
sending the response stay on the event loop. A streamed response is closed (request_finished) after
it is sent, in a second hop; any other response is closed in the first hop, since its content is
already in memory. The rare async view (tiles, thumbnails, regions; the lean tile route in front
answers most tiles) is adapted by Django and runs on the event loop while its thread waits.

``ONE_HOP_ASGI=0`` (settings) serves with Django's stock handler instead, to compare.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import BaseHandler
from django.http import FileResponse, HttpResponseBase
from django.urls import set_script_prefix


class OneHopASGIHandler(ASGIHandler):
    """An ASGI application for Django's HTTP requests: the synchronous middleware chain, one thread hop."""

    def __init__(self, threads: int | None = None) -> None:
        BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        self.threads = threads or settings.HTTP_THREADS
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="django-http")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def _in_thread(self, func: Any, *args: Any) -> Any:
        # thread_sensitive=False with our executor: asgiref still copies the context in and out and
        # lets async_to_sync inside (Channels' group_send from a view) come back to this event loop.
        return sync_to_async(func, thread_sensitive=False, executor=self.executor)(*args)

    def _respond(self, scope: dict[str, Any], body_file: Any) -> HttpResponseBase:
        """What Django's ASGI handler does between reading the body and sending, synchronously."""
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            response = error_response
        else:
            response = self.get_response(request)  # the synchronous middleware chain and view
        response._handler_class = self.__class__
        if isinstance(response, FileResponse):
            response.block_size = self.chunk_size
        if not response.streaming:
            response.close()  # request_finished: the database connection goes back to the pool now
        return response

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from django.core.exceptions import RequestAborted

        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))

        async def process_request() -> HttpResponseBase:
            response = await self._in_thread(self._respond, scope, body_file)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was sent
            return response

        # As Django's handler: a client that disconnects while the view runs cancels the wait (the
        # thread finishes its work; its response is then dropped).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await self._in_thread(signals.request_finished.send, self.__class__)
        else:
            if response.streaming:
                await self._in_thread(response.close)
        body_file.close()


def get_application() -> Any:
    """The Django HTTP application histoloop.asgi serves: this handler, or Django's with ONE_HOP_ASGI=0."""
    import django
    from django.core.asgi import get_asgi_application

    if not settings.ONE_HOP_ASGI:
        return get_asgi_application()
    django.setup(set_prefix=False)
    return OneHopASGIHandler()
