"""histoloop.supervisor with real child processes killed with SIGKILL, and a clock the test moves."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from histoloop.supervisor import Child, Supervisor
from tests.servers import live_processes_in_group

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def make(clock: Clock, said: list[str]) -> Iterator:  # type: ignore[type-arg]
    made: list[Supervisor] = []

    def make_supervisor(*children: Child) -> Supervisor:
        supervisor = Supervisor(children, say=said.append, clock=clock)
        made.append(supervisor)
        supervisor.start_all()
        return supervisor

    yield make_supervisor
    for supervisor in made:
        supervisor.stop_all(timeout=5)


def kill_9(child: Child) -> int:
    assert child.process is not None
    pid = child.process.pid
    os.kill(pid, signal.SIGKILL)
    child.process.wait(timeout=10)
    return pid


def test_a_child_killed_with_sigkill_is_started_again_after_the_back_off(make, clock: Clock, said: list[str]) -> None:  # type: ignore[no-untyped-def]
    worker = Child("the worker", SLEEPER, essential=False)
    web = Child("the web server", SLEEPER)
    supervisor = make(worker, web)
    web_pid = web.process.pid
    old = kill_9(worker)

    assert supervisor.check()
    assert said == [f"the worker (pid {old}) was killed by SIGKILL; starting a new one in 1 s."]
    assert worker.process.pid == old  # not yet: the back-off first
    clock.now += 1
    assert supervisor.check()
    assert worker.process.pid != old and worker.process.poll() is None
    assert said[-1] == f"the worker is running again (pid {worker.process.pid})."
    assert web.process.pid == web_pid and web.process.poll() is None  # the other child never stopped


def wait_and_check(supervisor: Supervisor, child: Child) -> bool:
    assert child.process is not None
    child.process.wait(timeout=10)
    return supervisor.check()


def test_the_back_off_doubles_while_it_keeps_dying_and_a_crash_loop_is_given_up(  # type: ignore[no-untyped-def]
    make, clock: Clock, said: list[str]
) -> None:
    worker = Child("the worker", CRASHER, essential=False, max_restarts=5)
    web = Child("the web server", SLEEPER)
    supervisor = make(worker, web)
    delays = []
    for _ in range(5):
        assert wait_and_check(supervisor, worker)
        delays.append(worker.delay)
        clock.now += worker.delay
        assert supervisor.check()  # started again
    assert delays == [1, 2, 4, 8, 16]
    assert "exited with status 3" in said[0]

    assert wait_and_check(supervisor, worker)  # the 6th death within a minute: not essential, so still True
    assert worker.given_up
    assert "has died 6 times within a minute; not starting it again, the rest keeps running" in said[-1]
    clock.now += 60
    assert supervisor.check()
    assert worker.process.poll() == 3  # nothing new was started
    assert web.process.poll() is None


def test_giving_up_on_an_essential_child_ends_supervision(make, clock: Clock, said: list[str]) -> None:  # type: ignore[no-untyped-def]
    web = Child("the web server", CRASHER, max_restarts=1)
    supervisor = make(web)
    assert wait_and_check(supervisor, web)
    clock.now += web.delay
    assert supervisor.check()
    assert not wait_and_check(supervisor, web)
    assert "stopping the demo" in said[-1]
    assert supervisor.run(interval=0) == 1


def test_a_child_that_ran_for_a_while_starts_its_back_off_afresh(make, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    worker = Child("the worker", SLEEPER, essential=False, max_restarts=2)
    supervisor = make(worker)
    for expected in (1, 2):
        kill_9(worker)
        supervisor.check()
        assert worker.delay == expected
        clock.now += worker.delay
        supervisor.check()
    clock.now += 120  # a stable run: the count of restarts in the last minute and the back-off reset
    kill_9(worker)
    supervisor.check()
    assert worker.delay == 1 and not worker.given_up


LEAVES_A_GRANDCHILD = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    " print(p.pid, flush=True); time.sleep(60)",
]


def test_what_a_killed_child_started_is_stopped_before_it_is_started_again(make, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    """Celery's embedded beat outlives a worker killed with SIGKILL unless the supervisor stops it."""
    worker = Child("the worker", LEAVES_A_GRANDCHILD, essential=False)
    supervisor = make(worker)
    old = worker.process.pid
    deadline = time.monotonic() + 10
    while len(live_processes_in_group(old)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(live_processes_in_group(old)) == 2  # the child and the grandchild it started
    kill_9(worker)
    assert len(live_processes_in_group(old)) == 1  # the grandchild lives on
    supervisor.check()
    deadline = time.monotonic() + 5
    while live_processes_in_group(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_in_group(old) == []


def test_stop_all_stops_every_child(make) -> None:  # type: ignore[no-untyped-def]
    children = [Child("a", SLEEPER), Child("b", SLEEPER)]
    supervisor = make(*children)
    supervisor.stop_all(timeout=5)
    assert [child.process.poll() for child in children] == [-signal.SIGTERM, -signal.SIGTERM]
