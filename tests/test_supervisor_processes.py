"""The Supervisor stopping real backend processes (issue 3), with real signals and real psutil.

Every process here is a child of the test (see ``_children``); the autouse fixture in
``conftest`` fails a test that leaves one running. Waits are short real ones: the slowest test
waits out a SIGTERM grace period of half a second, a few of them concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest
from _children import (
    exit_now_argv,
    exits_after_sigterm_argv,
    is_gone,
    parent_with_grandchild_argv,
    read_line,
    sigterm_deaf_argv,
    sleeper_argv,
    start,
)

from watchdog_async import (
    Backend,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    Eviction,
    EvictionReason,
    Supervisor,
    UnknownBackendError,
)
from watchdog_async._stopping import ProcessRef

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal semantics")

GRACE = 0.5  # stop_timeout where a test waits out the grace period between SIGTERM and SIGKILL
QUIET = 3600.0  # check_interval where the periodic check must not interfere


class Children:
    """The test's own child processes, killed (if still there) and reaped at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[str]] = []
        self.tracked: list[psutil.Process] = []

    def start(self, argv: list[str], *, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
        if stdin == subprocess.DEVNULL:
            proc = start(argv)
        else:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, text=True)
        self.popens.append(proc)
        return proc

    async def ready(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start a child and wait for its ``ready`` line (its signal handlers are in place)."""
        proc = self.start(argv)
        assert await read_line(proc) == "ready"
        return proc

    def track(self, pid: int) -> None:
        """A grandchild: killed at teardown if still there (it is not our child to reap)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.tracked.append(psutil.Process(pid))

    def close(self) -> None:
        for proc in self.popens:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.tracked.extend(psutil.Process(proc.pid).children(recursive=True))
        for ps_proc in self.tracked:
            with contextlib.suppress(psutil.NoSuchProcess):
                ps_proc.kill()  # psutil refuses a reused pid
        for proc in self.popens:
            proc.kill()  # a no-op once its status was collected
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    owned = Children()
    yield owned
    owned.close()


class Shutdown:
    """A shutdown callback recording its calls; it can fail, hang, or wait for a gate."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.error: BaseException | None = None
        self.hang = False
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()

    async def __call__(self, backend: Backend) -> None:
        self.calls.append(backend.address)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await anyio.sleep_forever()
        if self.error is not None:
            raise self.error


@contextlib.asynccontextmanager
async def supervisor(**kwargs: Any) -> AsyncIterator[Supervisor]:
    kwargs.setdefault("check_interval", QUIET)
    async with Supervisor(**kwargs) as sup:
        yield sup


def assert_running(pid: int) -> None:
    status = psutil.Process(pid).status()
    assert status not in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED), status


async def next_event(stream: AsyncIterator[Eviction], within: float = 5.0) -> Eviction:
    with anyio.fail_after(within):
        return await stream.__anext__()


# -- each accepted process type ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pid", "psutil", "popen"])
async def test_evict_stops_a_registered_pid_psutil_process_or_popen(
    kind: str, children: Children
) -> None:
    proc = children.start(sleeper_argv())
    given: object = {"pid": proc.pid, "psutil": psutil.Process(proc.pid), "popen": proc}[kind]
    async with supervisor(stop_timeout=5) as sup:
        backend = sup.register("b", "m", process=given)
        assert backend.pid == proc.pid
        assert sup.snapshot()[0].pid == proc.pid
        eviction = await sup.evict("b")
        assert (eviction.address, eviction.model) == ("b", "m")
        assert eviction.reason is EvictionReason.MANUAL
        assert eviction.ok
        assert eviction.error is None
        assert is_gone(proc.pid)
        assert sup.loaded_count == 0
    assert proc.wait(timeout=5) == -signal.SIGTERM  # stopped by SIGTERM, reaped by its owner


async def test_evict_stops_a_registered_asyncio_subprocess() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sleeper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        async with supervisor(stop_timeout=5) as sup:
            assert sup.register("b", "m", process=proc).pid == proc.pid
            eviction = await sup.evict("b")
            assert eviction.ok
            assert eviction.error is None
            assert sup.loaded_count == 0
    except BaseException:
        proc.kill()  # only on failure: the child watcher reaps it otherwise
        raise
    finally:
        returncode = await proc.wait()
    assert returncode == -signal.SIGTERM


async def test_evict_stops_a_registered_anyio_process() -> None:
    async with await anyio.open_process(
        sleeper_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    ) as proc:
        try:
            async with supervisor(stop_timeout=5) as sup:
                assert sup.register("b", "m", process=proc).pid == proc.pid
                eviction = await sup.evict("b")
                assert eviction.ok
                assert eviction.error is None
        except BaseException:
            proc.kill()  # only on failure; leaving the block waits for it
            raise
    assert proc.returncode == -signal.SIGTERM


async def test_register_refuses_a_process_that_already_exited(children: Children) -> None:
    proc = children.start(exit_now_argv())
    proc.wait(timeout=10)
    async with supervisor() as sup:
        with pytest.raises(ConfigError, match="already exited"):
            sup.register("b", "m", process=proc)
        assert sup.loaded_count == 0


# -- the stop, step by step --------------------------------------------------------------------


async def test_sigterm_deaf_process_is_killed_after_stop_timeout(children: Children) -> None:
    proc = await children.ready(sigterm_deaf_argv())
    async with supervisor(stop_timeout=GRACE) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert eviction.ok
        assert eviction.error is None
        assert eviction.duration >= GRACE  # the whole grace period was given to SIGTERM
        assert is_gone(proc.pid)
    assert proc.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.parametrize("child_deaf", [False, True], ids=["grandchild", "deaf-grandchild"])
async def test_parent_and_grandchild_are_both_stopped(child_deaf: bool, children: Children) -> None:
    proc = children.start(parent_with_grandchild_argv(child_deaf=child_deaf))
    parent_pid, grandchild_pid = map(int, (await read_line(proc)).split())
    children.track(grandchild_pid)
    assert parent_pid == proc.pid
    async with supervisor(stop_timeout=GRACE) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert eviction.ok
        assert is_gone(proc.pid)
        assert is_gone(grandchild_pid)


async def test_process_exiting_by_itself_during_the_stop_is_not_killed(
    children: Children,
) -> None:
    proc = await children.ready(exits_after_sigterm_argv(0.2))
    async with supervisor(stop_timeout=5) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert eviction.ok
        assert eviction.error is None
    assert proc.wait(timeout=5) == 0  # it left by itself: no SIGKILL


async def test_callback_that_raises_falls_back_to_signals(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    shutdown = Shutdown()
    shutdown.error = RuntimeError("backend refused to unload")
    async with supervisor(shutdown=shutdown, stop_timeout=5) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert shutdown.calls == ["b"]
        assert eviction.ok  # the process is confirmed gone
        assert eviction.error is shutdown.error  # and the callback's failure is reported
        assert sup.loaded_count == 0
        assert sup.faults == {"stop: RuntimeError": 1}
    assert proc.wait(timeout=5) == -signal.SIGTERM


async def test_callback_that_hangs_is_bounded_then_signals_stop_the_process(
    children: Children,
) -> None:
    proc = await children.ready(sleeper_argv())
    shutdown = Shutdown()
    shutdown.hang = True
    async with supervisor(shutdown=shutdown, stop_timeout=0.3) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert eviction.ok
        assert isinstance(eviction.error, TimeoutError)
        assert eviction.duration >= 0.3
        assert is_gone(proc.pid)
    assert proc.wait(timeout=5) == -signal.SIGTERM


QUITS_ON_STDIN = textwrap.dedent("""
    import sys
    print("ready", flush=True)
    sys.stdin.readline()
""")


async def test_callback_that_stops_the_process_itself_needs_no_signal(
    children: Children,
) -> None:
    proc = children.start([sys.executable, "-c", QUITS_ON_STDIN], stdin=subprocess.PIPE)
    assert await read_line(proc) == "ready"

    async def shutdown(backend: Backend) -> None:
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        await anyio.to_thread.run_sync(proc.wait, 5)  # its owner collects the status

    async with supervisor(shutdown=shutdown, stop_timeout=5) as sup:
        sup.register("b", "m", process=proc)
        eviction = await sup.evict("b")
        assert eviction.ok
        assert eviction.error is None
    assert proc.wait(timeout=5) == 0  # exited by itself: never signalled


# -- pid reuse ---------------------------------------------------------------------------------


def pretend_pid_reused(sup: Supervisor, address: str) -> int:
    """Make the record's process reference carry another create time, as if the registered
    process had died and the kernel had given its pid to the running one. Returns the pid."""
    record = sup._registry.get(address)
    assert record.process is not None
    pid = record.process.pid
    record.process = ProcessRef(pid, record.process.create_time - 1000.0)
    return pid


async def test_a_reused_pid_is_never_signalled_by_evict(children: Children) -> None:
    proc = await children.ready(sigterm_deaf_argv())  # SIGKILL would be visible as its status
    async with supervisor(stop_timeout=GRACE) as sup:
        sup.register("b", "m", process=proc)
        pid = pretend_pid_reused(sup, "b")
        eviction = await sup.evict("b")
        assert eviction.ok  # the registered process no longer exists
        assert sup.loaded_count == 0
    assert_running(pid)
    assert proc.poll() is None


async def test_a_reused_pid_is_reported_exited_and_never_signalled(children: Children) -> None:
    proc = await children.ready(sigterm_deaf_argv())
    async with supervisor(stop_timeout=GRACE) as sup:
        stream = sup.events()
        sup.register("b", "m", process=proc)
        pid = pretend_pid_reused(sup, "b")
        assert await sup.check() == []  # crash detection untracks; it evicts nothing
        event = await next_event(stream)
        assert (event.address, event.reason, event.ok) == ("b", EvictionReason.EXITED, True)
        assert sup.loaded_count == 0
    assert_running(pid)
    assert proc.poll() is None


# -- crash detection ---------------------------------------------------------------------------


async def test_backend_whose_process_dies_is_untracked_as_exited(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    caught: list[BackendStoppedError] = []
    entered = anyio.Event()
    async with supervisor(check_interval=0.1, stop_timeout=5) as sup:
        stream = sup.events()
        sup.register("b", "m", process=proc)

        async def caller() -> None:
            try:
                async with sup.busy("b"):
                    entered.set()
                    await anyio.sleep_forever()
            except BackendStoppedError as exc:
                caught.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await entered.wait()
                died = anyio.current_time()
                proc.kill()  # not the supervisor: the backend crashed
                event = await next_event(stream)
                noticed = anyio.current_time()
        assert (event.address, event.model) == ("b", "m")
        assert event.reason is EvictionReason.EXITED
        assert event.ok
        # within about one check_interval (0.1 s); the bound is generous for a loaded machine
        assert noticed - died < 2.0
        assert [(e.address, e.reason) for e in caught] == [("b", EvictionReason.EXITED)]
        assert sup.loaded_count == 0
        with pytest.raises(UnknownBackendError):
            async with sup.busy("b"):
                pass


async def test_check_detects_an_exited_backend_at_once(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    async with supervisor() as sup:  # no periodic check in this test's time
        sup.register("dead", "m", process=proc)
        sup.register("idle", "m2")
        proc.kill()
        proc.wait(timeout=5)
        assert await sup.check() == []  # exits are reported, not returned as evictions
        assert [s.address for s in sup.snapshot()] == ["idle"]


# -- busy timeout ------------------------------------------------------------------------------


async def test_busy_timeout_fails_the_caller_at_once_and_stops_the_process(
    children: Children,
) -> None:
    proc = await children.ready(sigterm_deaf_argv())  # its stop takes a full grace period
    alive_when_caller_failed: list[bool] = []
    async with supervisor(busy_timeout=0.3, stop_timeout=GRACE) as sup:
        stream = sup.events()
        sup.register("b", "m", process=proc)
        caught: list[BackendStoppedError] = []
        with anyio.fail_after(10):
            try:
                async with sup.busy("b"):
                    try:
                        await anyio.sleep_forever()
                    finally:
                        alive_when_caller_failed.append(not is_gone(proc.pid))
            except BackendStoppedError as exc:
                caught.append(exc)
        assert [e.reason for e in caught] == [EvictionReason.BUSY_TIMEOUT]
        assert alive_when_caller_failed == [True]  # not held up by the stop
        event = await next_event(stream)
        assert (event.address, event.reason, event.ok) == ("b", EvictionReason.BUSY_TIMEOUT, True)
        assert is_gone(proc.pid)
        assert sup.loaded_count == 0


# -- leaving the supervisor, forgetting ----------------------------------------------------------


async def test_leaving_stops_every_backend_concurrently(children: Children) -> None:
    procs = [await children.ready(sigterm_deaf_argv()) for _ in range(3)]
    all_started = anyio.Event()
    started: list[str] = []

    async def shutdown(backend: Backend) -> None:
        # Returns cleanly only if the three callbacks run at the same time; a stop done after
        # another would wait here until stop_timeout and report a TimeoutError.
        started.append(backend.address)
        if len(started) == 3:
            all_started.set()
        await all_started.wait()

    async with supervisor(shutdown=shutdown, stop_timeout=GRACE) as sup:
        stream = sup.events()
        for i, proc in enumerate(procs):
            sup.register(f"b{i}", "m", process=proc)
    events = [e async for e in stream]
    assert sorted(e.address for e in events) == ["b0", "b1", "b2"]
    assert all(e.reason is EvictionReason.CLOSING for e in events)
    assert all(e.ok and e.error is None for e in events)
    assert all(e.duration >= GRACE for e in events)  # each waited out its SIGTERM grace
    for proc in procs:
        assert proc.wait(timeout=5) == -signal.SIGKILL


async def test_forget_leaves_the_process_running(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    async with supervisor(stop_timeout=5) as sup:
        stream = sup.events()
        sup.register("b", "m", process=proc)
        forgotten = sup.forget("b")
        assert forgotten.pid == proc.pid
        assert sup.loaded_count == 0
    assert [e async for e in stream] == []
    assert_running(proc.pid)
    proc.kill()  # ours to stop
    assert proc.wait(timeout=5) == -signal.SIGKILL


async def test_stop_on_exit_false_leaves_processes_running(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    async with supervisor(stop_on_exit=False) as sup:
        sup.register("b", "m", process=proc)
    assert_running(proc.pid)
    proc.kill()
    assert proc.wait(timeout=5) == -signal.SIGKILL


# -- shared and failed stops -------------------------------------------------------------------


async def test_racing_evictions_share_one_stop(children: Children) -> None:
    proc = await children.ready(sleeper_argv())
    shutdown = Shutdown()
    shutdown.gate = anyio.Event()
    results: list[Eviction] = []

    async def evict(sup: Supervisor) -> None:
        results.append(await sup.evict("b"))

    async with supervisor(shutdown=shutdown, stop_timeout=5) as sup:
        sup.register("b", "m", process=proc)
        async with anyio.create_task_group() as tg:
            tg.start_soon(evict, sup)
            await shutdown.started.wait()  # the first stop is in its callback
            tg.start_soon(evict, sup)
            await anyio.wait_all_tasks_blocked()
            assert results == []
            shutdown.gate.set()
        assert len(results) == 2
        assert results[0] is results[1]
        assert results[0].ok
        assert shutdown.calls == ["b"]  # one stop, one callback
        assert is_gone(proc.pid)
    assert proc.wait(timeout=5) == -signal.SIGTERM


async def test_failed_stop_stays_tracked_and_counted_and_is_retried() -> None:
    shutdown = Shutdown()
    shutdown.error = RuntimeError("cannot unload")
    async with supervisor(shutdown=shutdown, max_loaded=1, stop_timeout=1) as sup:
        stream = sup.events()
        sup.register("b", "m")  # no process known: only the callback can stop it
        first = await sup.evict("b")
        assert not first.ok
        assert first.error is shutdown.error
        assert await next_event(stream) is first
        # still tracked, counted, and taking calls again
        assert sup.loaded_count == 1
        [status] = sup.snapshot()
        assert (status.address, status.stopping) == ("b", False)
        async with sup.busy("b"):
            pass
        assert sup.faults == {"stop: RuntimeError": 1}
        # the next eviction that picks it tries again, once per call
        with pytest.raises(CapacityError) as info:
            await sup.make_room(timeout=0)
        assert [(e.address, e.ok) for e in info.value.evictions] == [("b", False)]
        assert shutdown.calls == ["b", "b"]
        assert sup.faults == {"stop: RuntimeError": 2}
        # once the callback works, the retry succeeds
        shutdown.error = None
        [third] = await sup.make_room(timeout=0)
        assert (third.address, third.reason, third.ok) == ("b", EvictionReason.LRU, True)
        assert shutdown.calls == ["b", "b", "b"]
        assert sup.loaded_count == 0
