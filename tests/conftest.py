"""Shared pytest fixtures.

``clock`` (a ManualClock at 1000 s), ``recorder`` (a shutdown callback that records stops) and
``open_sup`` (``await open_sup(**settings)``: a supervisor with both, closed after the test).

``no_leaked_children`` (autouse): a test must not leave a child process of its own running. It
compares this process's descendants after the test with those before it; new ones still running
(zombies excepted) after a short grace are killed and fail the test, with their pids and command
lines. New zombie children of this process are reaped, so they do not pile up over a session.

A process whose parent has exited is re-parented out of this process's tree, so an orphaned
grandchild escapes this check: tests that make grandchildren check those themselves.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import psutil
import pytest
from _support import OpenSup, Recorder

from watchdog_async import Supervisor
from watchdog_async.testing import ManualClock

LEAK_GRACE = 2.0  # seconds for processes on their way out to finish exiting
_POLL = 0.02


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())!r}"
    except psutil.Error:
        return f"{proc.pid} (exited)"


def _reap_new_zombies(me: psutil.Process, before: set[psutil.Process]) -> None:
    """Collect the exit status of this process's new children that are zombies; never block."""
    for child in me.children():
        if child in before:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass  # already reaped by its owner


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves a descendant process running (after killing it)."""
    me = psutil.Process()
    before = set(me.children(recursive=True))
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        leaked = [p for p in me.children(recursive=True) if p not in before and _running(p)]
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    described = [_describe(p) for p in leaked]
    for proc in leaked:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # Wait for the killed ones to exit (polling: psutil's wait_procs would reap them too, and
    # their owners, if any, may still want their status), then reap the new zombies.
    kill_deadline = time.monotonic() + LEAK_GRACE
    while any(_running(p) for p in leaked) and time.monotonic() < kill_deadline:
        time.sleep(_POLL)
    _reap_new_zombies(me, before)
    if leaked:
        pytest.fail("test left child processes running: " + "; ".join(described), pytrace=False)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def open_sup(clock: ManualClock, recorder: Recorder) -> AsyncIterator[OpenSup]:
    """Open supervisors with the test's clock and recorder; close them at the end."""
    async with AsyncExitStack() as stack:

        async def open_(**settings: Any) -> Supervisor:
            sup = Supervisor(shutdown=recorder, clock=clock, **settings)
            return await stack.enter_async_context(sup)

        yield open_
