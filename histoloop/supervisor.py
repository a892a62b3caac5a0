"""Keeps the demo's processes running: a child that dies is started again, with a message.

``make demo`` (histoloop.launcher) runs the Celery worker and the web server under a
:class:`Supervisor`. When one dies (``kill -9``, a crash, the kernel's OOM killer) it is started
again after a back-off that doubles while it keeps dying soon after starting (1 s, 2 s, 4 s …
at most 30 s). A child that dies more than ``max_restarts`` times in a minute is given up: a crash
loop is a problem to fix, not to hide. Giving up on a child that is not ``essential`` (the worker)
leaves the rest serving; giving up on an essential one (the web server) ends the demo.
In production, Docker's restart policies do this job (docker/compose.yml).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str  # for messages: "the Celery worker"
    command: Sequence[str]
    essential: bool = True
    max_restarts: int = 5  # in any 60 s; one more death and the child is given up
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    stable_after: float = 60.0  # a child that ran this long starts its back-off afresh
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    delay: float = 0.0
    restarts: deque[float] = field(default_factory=deque)
    given_up: bool = False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    def __init__(
        self,
        children: Sequence[Child],
        *,
        cwd: Path | None = None,
        say: Callable[[str], None] = lambda text: print(f"histoloop: {text}", flush=True),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = list(children)
        self.cwd = cwd
        self.say = say
        self.clock = clock

    def start(self, child: Child) -> None:
        # Its own process group: what it started (Celery's embedded beat, pool processes) can be
        # stopped with it, even when the child itself was killed and could not stop them.
        child.process = subprocess.Popen(list(child.command), cwd=self.cwd, process_group=0)
        child.started_at = self.clock()
        child.restart_at = None

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def check(self) -> bool:
        """Restart what died and is due; False once an essential child has been given up."""
        now = self.clock()
        for child in self.children:
            if child.given_up or child.process is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.start(child)
                    self.say(f"{child.name} is running again (pid {child.process.pid}).")
                continue
            code = child.process.poll()
            if code is None:
                continue
            kill_group(child.process.pid)  # leftovers of the dead child would run beside the new one
            self._died(child, code, now)
        return not any(child.given_up and child.essential for child in self.children)

    def _died(self, child: Child, code: int, now: float) -> None:
        assert child.process is not None
        pid = child.process.pid
        while child.restarts and now - child.restarts[0] > 60:
            child.restarts.popleft()
        if len(child.restarts) >= child.max_restarts:
            child.given_up = True
            consequence = "stopping the demo" if child.essential else "the rest keeps running without it"
            self.say(
                f"{child.name} (pid {pid}) {describe_exit(code)} and has died {len(child.restarts) + 1} times "
                f"within a minute; not starting it again, {consequence}. Check its messages above."
            )
            return
        lived = now - child.started_at
        child.delay = (
            child.backoff_initial
            if lived >= child.stable_after or not child.delay
            else min(child.delay * 2, child.backoff_max)
        )
        child.restarts.append(now)
        child.restart_at = now + child.delay
        self.say(f"{child.name} (pid {pid}) {describe_exit(code)}; starting a new one in {child.delay:g} s.")

    def run(self, interval: float = 0.5) -> int:
        """Supervise until an essential child is given up (returns 1); Ctrl+C propagates."""
        while self.check():
            time.sleep(interval)
        return 1

    def stop_all(self, timeout: float = 15) -> None:
        started = [c.process for c in self.children if c.process is not None]
        running = [process for process in started if process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)  # the child stops its own processes cleanly
        for process in running:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for process in started:
            kill_group(process.pid)


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in a child's process group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left
