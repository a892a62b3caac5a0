"""A zip archive written while it is sent: Python's zipfile over a sink that cannot seek.

zipfile writes to a non-seekable file by putting each entry's CRC and sizes in a data descriptor
after its bytes (and Zip64 records once there are more than 65,535 entries or 4 GiB of offsets),
so nothing is spooled to disk and the only state that grows with the archive is the central
directory (one small record per entry, written at the end). :class:`ZipStream` hands back the bytes
each call produced, for a generator to yield.

Under ASGI, Django serves a *synchronous* iterator by first reading it to the end into a list (see
``StreamingHttpResponse.__aiter__``): a 5 GB archive would sit in memory. :func:`streaming_response`
gives the ASGI server an asynchronous iterator that pulls one chunk at a time instead.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, StreamingHttpResponse


class _Sink(io.RawIOBase):
    """Collects what zipfile writes until it is taken; ``tell``/``seek`` are unsupported on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class ZipStream:
    """Entries in, zip bytes out; the archive is complete once :meth:`close` has returned its tail."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, "w", allowZip64=True)
        self._date_time = time.localtime()[:6]

    def _info(self, name: str, compress: bool) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=self._date_time)  # type: ignore[arg-type]
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        return info

    def add(self, name: str, data: bytes, *, compress: bool = False) -> bytes:
        """One whole entry (PNGs are compressed already: stored). Returns the bytes to send."""
        self._zip.writestr(self._info(name, compress), data)
        return self._sink.take()

    def open(self, name: str, *, compress: bool = True) -> Any:
        """A writable entry for text too large to hold whole; call :meth:`take` as it fills."""
        return self._zip.open(self._info(name, compress), mode="w", force_zip64=True)

    def take(self) -> bytes:
        return self._sink.take()

    def close(self) -> bytes:
        """The central directory: the archive's last bytes."""
        self._zip.close()
        return self._sink.take()


async def _pull(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """One chunk per hop to the request's sync thread (the same thread throughout, so the
    generator's database cursor stays on its connection)."""

    def step() -> bytes:
        return next(chunks, b"")

    pull = sync_to_async(step, thread_sensitive=True)
    try:
        while chunk := await pull():
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()


def streaming_response(
    request: HttpRequest, chunks: Iterator[bytes], *, content_type: str, filename: str
) -> StreamingHttpResponse:
    """A download streamed chunk by chunk under both WSGI and ASGI (see the module docstring).

    ``chunks`` must never yield ``b""`` (it marks the end for the ASGI pump).
    """
    content: Any = _pull(chunks) if isinstance(request, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["X-Accel-Buffering"] = "no"  # a proxy in front must pass the chunks on, not buffer the archive
    return response
