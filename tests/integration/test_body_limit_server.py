"""Request body limits through the real server (histoloop.serve), with a raw socket client.

The server's TMPDIR is a folder of this test's own, so any file it spools a body into shows up
there (Django's spooled temporary file is unlinked at once, but stays visible among the
server's open files in /proc)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.authtoken.models import Token

from tests.factories import UserFactory
from tests.integration.conftest import test_database_url as database_url_of_the_tests
from tests.servers import asgi_server


@pytest.fixture(scope="module")
def server(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """(port, the server's TMPDIR)."""
    spool = tmp_path_factory.mktemp("server-tmp")
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url_of_the_tests(),
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        TMPDIR=str(spool),
        DEBUG="1",
        FAST_PASSWORD_HASHING="1" if "MD5" in settings.PASSWORD_HASHERS[0] else "0",
    )
    env.pop("TEST_DATABASE_NAME", None)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with asgi_server(env, log, workers=1) as port:
        yield port, spool


def open_files_under(folder: Path) -> list[str]:
    """Paths under ``folder`` that any process on the machine has open (deleted ones included)."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # a process that ended, or one we may not look into
        found += [link for link in links if link.startswith(str(folder))]
    return found


def start_request(port: int, path: str, content_length: int | None, extra_headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    length = f"Content-Length: {content_length}\r\n" if content_length is not None else "Transfer-Encoding: chunked\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"{length}{extra_headers}\r\n"
    )
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, everything the server sent until it closed the connection)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        # A server closing with request bytes still unread sends a reset after its answer.
        if not data:
            raise
    return int(data.split(b" ", 2)[1]), data


def bytes_accepted_after_refusal(sock: socket.socket, limit: int = 64 * 1024**2) -> int:
    """Keep sending until the server's side stops taking data; how much went out."""
    sock.settimeout(2)
    sent = 0
    chunk = b"x" * 65536
    try:
        while sent < limit:
            sent += sock.send(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_a_huge_announced_body_is_refused_at_once_and_never_read(server: tuple[int, Path]) -> None:
    port, spool = server
    sock = start_request(port, "/api/v1/projects/1/votes/", 10**12)
    started = time.monotonic()
    # The answer comes with no byte of the body sent (sending some first races the server's close:
    # its kernel then resets the connection and may drop the answer before we read it).
    status, response = read_response(sock)  # returns once the server closes the connection
    assert status == 413
    assert b'"detail": "The request body is larger than the 4.0 MB this address accepts' in response
    assert time.monotonic() - started < 5
    # Closed: what we send now goes nowhere (at most what the kernel buffers before the reset).
    assert bytes_accepted_after_refusal(sock) < 8 * 1024**2
    sock.close()
    assert open_files_under(spool) == []
    assert list(spool.iterdir()) == []


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(server: tuple[int, Path]) -> None:
    port, spool = server
    sock = start_request(port, "/accounts/login/", None)
    chunk = b"x" * 65536
    sent = 0
    sock.settimeout(0.05)
    response = b""
    while not response and sent < 64 * 1024**2:
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            response = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.settimeout(10)
    if not response:
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert settings.MAX_REQUEST_BYTES < sent < settings.MAX_REQUEST_BYTES + 8 * 1024**2
    sock.close()
    assert open_files_under(spool) == []


def test_an_anonymous_large_upload_is_refused_and_told_to_log_in(server: tuple[int, Path]) -> None:
    port, spool = server
    sock = start_request(port, "/api/v1/projects/1/slides/", 100 * 1024**2)
    sock.sendall(b"x" * 65536)
    status, response = read_response(sock)
    assert status == 413
    assert b"accepted only from a logged-in user" in response
    sock.close()
    assert open_files_under(spool) == []


@pytest.mark.django_db(transaction=True)
def test_a_forged_session_cookie_does_not_count_as_logged_in(server: tuple[int, Path]) -> None:
    port, spool = server
    sock = start_request(port, "/projects/1/slides/upload/", 100 * 1024**2, "Cookie: sessionid=forged0000\r\n")
    status, response = read_response(sock)
    assert status == 413
    assert b"logged-in user" in response
    sock.close()
    assert open_files_under(spool) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("credential", ["token", "session"])
def test_a_logged_in_upload_is_read_and_spooled(server: tuple[int, Path], credential: str) -> None:
    """The other side of the checks above: a logged-in user's large body is accepted and spooled,
    so the open-file check would see one."""
    port, spool = server
    user = UserFactory()
    if credential == "token":
        header = f"Authorization: Token {Token.objects.create(user=user).key}\r\n"
    else:
        client = Client()
        client.force_login(user)
        header = f"Cookie: {settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}\r\n"
    sock = start_request(port, "/api/v1/projects/1/slides/", 100 * 1024**2, header)
    sock.sendall(b"x" * (settings.MAX_REQUEST_BYTES + 2 * 1024**2))
    deadline = time.monotonic() + 10
    while not open_files_under(spool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_files_under(spool), "the server did not spool the authenticated upload"
    sock.close()
