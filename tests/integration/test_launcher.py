"""`make demo`'s launcher, for real: kill -9 of its Celery worker brings a new one up within
seconds while the pages keep being served, with DEBUG off as the demo runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from histoloop.embedded import free_port
from tests.integration.conftest import REPO_ROOT, wait_for
from tests.integration.conftest import test_database_url as database_url_of_the_tests
from tests.servers import live_processes_in_group


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL we built
        return response.status, response.read().decode()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to collect it.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.django_db(transaction=True)
def test_the_demo_survives_kill_9_of_its_worker(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "DJANGO_SETTINGS_MODULE", "TEST_DATABASE_NAME"}}
    env.update(
        DATABASE_URL=database_url_of_the_tests(),
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        STATIC_ROOT=str(tmp_path / "static"),
        SECRET_KEY="launcher-test-" + "k" * 40,
        HISTOLOOP_PORT=str(port),
        WEB_CONCURRENCY="1",
    )
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "histoloop.launcher", "--no-seed"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so clean-up below reaches every child
            # As a shell without job control starts it in the background: Ctrl+C (SIGINT) ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    base = f"http://127.0.0.1:{port}"

    def text() -> str:
        return log.read_text(errors="replace")

    try:
        wait_for(lambda: "Histoloop is running at" in text() or launcher.poll() is not None, timeout=180)
        assert launcher.poll() is None, text()
        first = int(re.search(r"started the Celery worker \(pid (\d+)\)", text()).group(1))  # type: ignore[union-attr]
        wait_for(lambda: text().count(" ready.") >= 1, timeout=120, message="the worker to be ready")
        status, page = get(f"{base}/accounts/login/")
        assert status == 200
        css = re.search(r'href="(/static/frontend/app\.[0-9a-f]+\.css)"', page)  # DEBUG off: hashed names
        assert css is not None, page
        assert get(base + css.group(1))[0] == 200

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: f"the Celery worker (pid {first}) was killed by SIGKILL" in text(), timeout=10)
        assert get(f"{base}/accounts/login/")[0] == 200  # the pages are still served
        restarted = wait_for(lambda: re.search(r"the Celery worker is running again \(pid (\d+)\)", text()), timeout=15)
        second = int(restarted.group(1))
        assert second != first and alive(second)
        # Nothing of the killed worker (its embedded beat, its pool processes) runs beside the new one.
        assert live_processes_in_group(first) == []
        wait_for(lambda: text().count(" ready.") >= 2, timeout=120, message="the new worker to be ready")
        assert get(f"{base}/accounts/login/")[0] == 200
        assert launcher.poll() is None

        launcher.send_signal(signal.SIGINT)  # Ctrl+C stops it all the same
        assert launcher.wait(timeout=60) == 0, text()
        assert not alive(second), "the launcher left its worker running"
        assert live_processes_in_group(second) == []
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
