"""Tests of watchdog_async._stopping with real child processes (no mocks).

Timeouts are short real ones; the slowest test waits out a grace period of half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import anyio
import psutil
import pytest
from _children import (
    exit_now_argv,
    exits_after_sigterm_argv,
    forks_on_sigterm_argv,
    is_gone,
    parent_with_grandchild_argv,
    read_line,
    sigterm_deaf_argv,
    sleeper_argv,
    start,
)

from watchdog_async._errors import ConfigError
from watchdog_async._stopping import (
    ProcessRef,
    TreeStopResult,
    stop_backend,
    stop_tree,
    tree_pids,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal semantics")

GRACE = 0.5  # seconds between SIGTERM and SIGKILL where a test waits it out


class Children:
    """The test's own child processes, stopped and reaped at teardown.

    ``track`` adds a pid learnt from a child (a grandchild), killed at teardown if still there.
    """

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[str]] = []
        self.tracked: list[psutil.Process] = []

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = start(argv)
        self.popens.append(proc)
        return proc

    def track(self, pid: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.tracked.append(psutil.Process(pid))

    def close(self) -> None:
        for proc in self.popens:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.tracked.extend(psutil.Process(proc.pid).children(recursive=True))
        for ps_proc in self.tracked:
            with contextlib.suppress(psutil.NoSuchProcess):
                ps_proc.kill()  # refuses a reused pid
        for proc in self.popens:
            proc.kill()  # a no-op once it has exited
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    owned = Children()
    yield owned
    owned.close()


async def start_ready(children: Children, argv: list[str]) -> subprocess.Popen[str]:
    proc = children.start(argv)
    assert await read_line(proc) == "ready"
    return proc


def assert_running(pid: int) -> None:
    status = psutil.Process(pid).status()
    assert status not in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED), status


async def wait_zombie(pid: int) -> None:
    with anyio.fail_after(10):
        while True:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
            await anyio.sleep(0.005)


# --- ProcessRef ---------------------------------------------------------------------------


def test_resolve_int_pid(children: Children) -> None:
    proc = children.start(sleeper_argv())
    ref = ProcessRef.resolve(proc.pid)
    assert ref.pid == proc.pid
    assert ref.create_time == psutil.Process(proc.pid).create_time()
    assert ref.is_alive()
    assert ref.process() == psutil.Process(proc.pid)


def test_resolve_psutil_process(children: Children) -> None:
    proc = children.start(sleeper_argv())
    ps_proc = psutil.Process(proc.pid)
    ref = ProcessRef.resolve(ps_proc)
    assert (ref.pid, ref.create_time) == (proc.pid, ps_proc.create_time())
    assert ref.is_alive()


def test_resolve_popen(children: Children) -> None:
    proc = children.start(sleeper_argv())
    ref = ProcessRef.resolve(proc)
    assert (ref.pid, ref.create_time) == (proc.pid, psutil.Process(proc.pid).create_time())
    assert ref == ProcessRef(proc.pid, ref.create_time)  # equality ignores the kept psutil object


@posix_only
async def test_resolve_and_stop_asyncio_subprocess() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sleeper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        ref = ProcessRef.resolve(proc)
        assert ref.pid == proc.pid
        assert ref.is_alive()
        result = await stop_tree(ref, timeout=5)
        assert result.gone
        assert result.signalled == (proc.pid,)
    except BaseException:
        # Only here: killing an exited asyncio child polls (reaps) it under its watcher's feet.
        proc.kill()
        raise
    finally:
        returncode = await proc.wait()
    assert returncode == -signal.SIGTERM  # the owner, not stop_tree, collected the status


@posix_only
async def test_resolve_and_stop_anyio_process() -> None:
    async with await anyio.open_process(
        sleeper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    ) as proc:
        try:
            ref = ProcessRef.resolve(proc)
            assert ref.pid == proc.pid
            assert ref.is_alive()
            result = await stop_tree(ref, timeout=5)
            assert result.gone
            assert result.signalled == (proc.pid,)
        except BaseException:
            proc.kill()  # only here, as above; leaving the block waits for it
            raise
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize("value", [True, False, "123", None, 1.5, [1], -1, 0])
def test_resolve_rejects_bad_values(value: object) -> None:
    with pytest.raises(ConfigError):
        ProcessRef.resolve(value)


def test_resolve_rejects_own_pid() -> None:
    with pytest.raises(ConfigError, match="this process"):
        ProcessRef.resolve(os.getpid())


def test_resolve_rejects_exited_processes() -> None:
    proc = subprocess.Popen(exit_now_argv())
    proc.wait()
    with pytest.raises(ConfigError, match="already exited"):
        ProcessRef.resolve(proc)  # its status was collected: the pid may name another process
    if psutil.pid_exists(proc.pid):
        pytest.skip("the pid was reused at once")
    with pytest.raises(ConfigError, match="no process"):
        ProcessRef.resolve(proc.pid)


@posix_only
async def test_is_alive_false_for_a_zombie_and_after_reaping(children: Children) -> None:
    proc = children.start(exit_now_argv())
    try:
        ref = ProcessRef.resolve(proc.pid)  # running or already a zombie: both accepted
        await wait_zombie(proc.pid)
        assert not ref.is_alive()
        assert ref.process() is not None  # still the registered process until reaped
        result = await stop_tree(ref, timeout=GRACE)
        assert result == TreeStopResult(gone=True, error=None, signalled=(), killed=())
    finally:
        assert proc.wait(timeout=10) == 0  # not reaped by anything in between
    assert not ref.is_alive()
    assert ref.process() is None


def test_reused_pid_is_not_alive(children: Children) -> None:
    proc = children.start(sleeper_argv())
    real = ProcessRef.resolve(proc)
    reused = ProcessRef(proc.pid, real.create_time - 1000)
    assert not reused.is_alive()
    assert reused.process() is None
    assert real.is_alive()


# --- stop_tree ----------------------------------------------------------------------------


@posix_only
async def test_sleeper_is_stopped_by_sigterm(children: Children) -> None:
    proc = await start_ready(children, sleeper_argv())
    bystander = await start_ready(children, sleeper_argv())
    ref = ProcessRef.resolve(proc)
    start = anyio.current_time()
    result = await stop_tree(ref, timeout=5)
    assert anyio.current_time() - start < 2
    assert result == TreeStopResult(gone=True, error=None, signalled=(proc.pid,), killed=())
    assert not ref.is_alive()
    assert proc.wait(timeout=10) == -signal.SIGTERM  # left for its owner to reap
    assert_running(bystander.pid)  # outside the tree: never signalled


@posix_only
async def test_sigterm_deaf_process_is_killed_after_the_grace_period(children: Children) -> None:
    proc = await start_ready(children, sigterm_deaf_argv())
    start = anyio.current_time()
    result = await stop_tree(ProcessRef.resolve(proc), timeout=GRACE)
    assert anyio.current_time() - start >= GRACE
    assert result == TreeStopResult(
        gone=True, error=None, signalled=(proc.pid,), killed=(proc.pid,)
    )
    assert proc.wait(timeout=10) == -signal.SIGKILL


@posix_only
async def test_parent_and_grandchild_are_both_stopped(children: Children) -> None:
    proc = children.start(parent_with_grandchild_argv())
    parent_pid, child_pid = map(int, (await read_line(proc)).split())
    children.track(child_pid)
    result = await stop_tree(ProcessRef.resolve(proc), timeout=5)
    assert result.gone
    assert result.error is None
    assert sorted(result.signalled) == sorted([parent_pid, child_pid])
    assert result.killed == ()
    assert is_gone(child_pid)
    assert proc.wait(timeout=10) == -signal.SIGTERM


@posix_only
async def test_deaf_grandchild_is_killed(children: Children) -> None:
    proc = children.start(parent_with_grandchild_argv(child_deaf=True))
    parent_pid, child_pid = map(int, (await read_line(proc)).split())
    children.track(child_pid)
    result = await stop_tree(ProcessRef.resolve(proc), timeout=GRACE)
    assert result.gone
    assert sorted(result.signalled) == sorted([parent_pid, child_pid])
    assert result.killed == (child_pid,)
    assert is_gone(child_pid)


@posix_only
async def test_process_exiting_by_itself_during_the_stop(children: Children) -> None:
    proc = await start_ready(children, exits_after_sigterm_argv(delay=0.2))
    start = anyio.current_time()
    result = await stop_tree(ProcessRef.resolve(proc), timeout=5)
    assert anyio.current_time() - start < 2  # no need to wait out the grace period
    assert result == TreeStopResult(gone=True, error=None, signalled=(proc.pid,), killed=())
    assert proc.wait(timeout=10) == 0


@posix_only
async def test_children_forked_during_the_grace_period_are_killed(children: Children) -> None:
    proc = await start_ready(children, forks_on_sigterm_argv())
    result = await stop_tree(ProcessRef.resolve(proc), timeout=GRACE)
    late_pid = int(await read_line(proc))  # printed by the parent's SIGTERM handler
    children.track(late_pid)
    assert result.gone
    assert result.error is None
    assert result.signalled == (proc.pid,)
    assert sorted(result.killed) == sorted([proc.pid, late_pid])
    assert is_gone(late_pid)
    assert proc.wait(timeout=10) == -signal.SIGKILL


@posix_only
async def test_reused_pid_is_never_signalled(children: Children) -> None:
    proc = await start_ready(children, sleeper_argv())
    real = ProcessRef.resolve(proc)
    result = await stop_tree(ProcessRef(proc.pid, real.create_time - 1000), timeout=GRACE)
    assert result == TreeStopResult(gone=True, error=None, signalled=(), killed=())
    assert real.is_alive()
    assert_running(proc.pid)


@posix_only
async def test_cancelled_stop_leaves_no_process_frozen(children: Children) -> None:
    proc = await start_ready(children, sigterm_deaf_argv())
    start = anyio.current_time()
    with anyio.move_on_after(0.2) as scope:
        await stop_tree(ProcessRef.resolve(proc), timeout=5)
    assert scope.cancelled_caught
    assert anyio.current_time() - start < 1
    assert_running(proc.pid)  # SIGTERM was ignored; no SIGSTOP, no SIGKILL was sent


@pytest.mark.parametrize(
    ("grace", "kill_wait"), [(math.nan, None), (-1.0, None), (1.0, -0.5), (1.0, math.nan)]
)
async def test_bad_durations_are_rejected_before_any_signal(
    children: Children, grace: float, kill_wait: float | None
) -> None:
    proc = await start_ready(children, sleeper_argv())
    with pytest.raises(ConfigError):
        await stop_tree(ProcessRef.resolve(proc), timeout=grace, kill_wait=kill_wait)
    assert_running(proc.pid)


# --- tree_pids, stop_backend --------------------------------------------------------------


@posix_only
async def test_tree_pids_lists_the_live_tree(children: Children) -> None:
    proc = children.start(parent_with_grandchild_argv())
    parent_pid, child_pid = map(int, (await read_line(proc)).split())
    children.track(child_pid)
    ref = ProcessRef.resolve(proc)
    assert tree_pids(ref) == (parent_pid, child_pid)
    assert tree_pids(ProcessRef(proc.pid, ref.create_time - 1000)) == ()
    assert (await stop_tree(ref, timeout=5)).gone
    assert tree_pids(ref) == ()


@posix_only
async def test_stop_backend_runs_the_callback_then_stops_the_tree(children: Children) -> None:
    proc = await start_ready(children, sleeper_argv())
    seen: list[tuple[str, bool]] = []

    async def shutdown(backend: str) -> None:
        seen.append((backend, psutil.Process(proc.pid).is_running()))

    ok, error = await stop_backend(
        "b1", ProcessRef.resolve(proc), shutdown=shutdown, stop_timeout=5
    )
    assert (ok, error) == (True, None)
    assert seen == [("b1", True)]
    assert proc.wait(timeout=10) == -signal.SIGTERM


@posix_only
async def test_stop_backend_failing_callback_still_stops_the_tree(children: Children) -> None:
    proc = await start_ready(children, sleeper_argv())
    failure = RuntimeError("shutdown failed")

    async def shutdown(backend: str) -> None:
        raise failure

    ok, error = await stop_backend(
        "b1", ProcessRef.resolve(proc), shutdown=shutdown, stop_timeout=5
    )
    assert ok
    assert error is failure
    assert proc.wait(timeout=10) == -signal.SIGTERM


@posix_only
async def test_stop_backend_bounds_a_slow_callback(children: Children) -> None:
    proc = await start_ready(children, sleeper_argv())

    async def shutdown(backend: str) -> None:
        await anyio.sleep_forever()

    start = anyio.current_time()
    ok, error = await stop_backend(
        "b1", ProcessRef.resolve(proc), shutdown=shutdown, stop_timeout=0.2
    )
    assert anyio.current_time() - start < 2
    assert ok
    assert isinstance(error, TimeoutError)
    assert proc.wait(timeout=10) == -signal.SIGTERM


async def test_stop_backend_without_a_process() -> None:
    failure = RuntimeError("shutdown failed")

    async def fine(backend: str) -> None:
        pass

    async def failing(backend: str) -> None:
        raise failure

    assert await stop_backend("b1", None, shutdown=fine, stop_timeout=1) == (True, None)
    assert await stop_backend("b1", None, shutdown=None, stop_timeout=1) == (True, None)
    assert await stop_backend("b1", None, shutdown=failing, stop_timeout=1) == (False, failure)
