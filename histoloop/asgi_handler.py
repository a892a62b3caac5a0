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
included, as one call in a thread, the way a WSGI server would; reading the body and sending the
response stay on the event loop. As under Django's handler, each request has a thread of its own for
all its thread-sensitive work (asgiref's ``ThreadSensitiveContext``), so a streamed download's chunks
(annotations.zip_stream) and its close run on the thread, and the database connection, its view used;
but the thread is reused: an idle one (up to ``HTTP_THREADS`` are kept) serves the next request instead
of a new thread being started and joined every time. A streamed response is closed (request_finished)
after it is sent, in a second hop; any other response is closed in the first hop, since its content
is already in memory. The rare async view (tiles, thumbnails, regions; the lean tile route in front
answers most tiles) is adapted by Django and runs on the event loop while its thread waits.

``ONE_HOP_ASGI=0`` (settings) serves with Django's stock handler instead, to compare.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
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
        self._idle: list[ThreadPoolExecutor] = []  # single-thread executors no request is using

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        thread = self._idle.pop() if self._idle else ThreadPoolExecutor(1, thread_name_prefix="django-http")
        finished = False
        try:
            async with ThreadSensitiveContext(executor=thread):
                finished = await self.handle(scope, receive, send)
        finally:
            # A request cancelled while its view ran may still occupy the thread: that one is let go.
            if finished and len(self._idle) < self.threads:
                self._idle.append(thread)
            else:
                thread.shutdown(wait=False)

    async def run_in_thread(self, func: Any, *args: Any) -> Any:
        """``func(*args)`` in one of the handler's request threads: an idle one, or a new one kept after.

        For the lean routes in front of Django (annotations.lean_queue), so that their requests share
        these threads, and so the database connections the threads hold, with Django's."""
        thread = self._idle.pop() if self._idle else ThreadPoolExecutor(1, thread_name_prefix="django-http")
        finished = False
        try:
            result = await asyncio.get_running_loop().run_in_executor(thread, func, *args)
            finished = True
            return result
        finally:
            if finished and len(self._idle) < self.threads:
                self._idle.append(thread)
            else:
                thread.shutdown(wait=False)

    @staticmethod
    def _in_thread(func: Any, *args: Any) -> Any:
        # Thread-sensitive: the request's own thread (its ThreadSensitiveContext), like every other
        # thread-sensitive call the request makes (a streamed download's chunks included).
        return sync_to_async(func)(*args)

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

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> bool:  # type: ignore[override]
        """Django's ``ASGIHandler.handle`` with the one hop; True unless the view's wait was cancelled."""
        from django.core.exceptions import RequestAborted

        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return True
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
            body_file.close()
            return False  # the thread may still run the view; request_finished comes from its close there
        if response.streaming:
            await self._in_thread(response.close)
        body_file.close()
        return True


def get_application() -> Any:
    """The Django HTTP application histoloop.asgi serves: this handler, or Django's with ONE_HOP_ASGI=0."""
    import django
    from django.core.asgi import get_asgi_application

    if not settings.ONE_HOP_ASGI:
        return get_asgi_application()
    django.setup(set_prefix=False)
    return OneHopASGIHandler()
