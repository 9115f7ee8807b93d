"""Fault injection: shutdown callbacks that raise, hang past ``stop_timeout`` or are slow; memory
probes that raise, hang past ``probe_timeout`` or return nonsense (with the reclaimer on and a
short ``check_interval``); processes that ignore SIGTERM, fork, or exit in the middle of a stop
or by themselves; an ``events()`` subscriber that never reads.

In every case the test checks four things: the supervisor keeps working (a new backend can be
registered, called and evicted afterwards), the fault is reported (``sup.faults``,
``Eviction.error``), it is logged once (one WARNING-or-worse record carrying its traceback the
first time, none when the same kind of fault happens again), and the state stays consistent
(nothing left in flight or marked stopping; a backend that could not be stopped is still
tracked and can be evicted later).

Real time is used only where the supervisor itself waits in real time: stop and probe
timeouts, the periodic memory check, and real processes. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import signal
import subprocess
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import anyio
import psutil
import pytest
from _children import (
    exits_after_sigterm_argv,
    forks_on_sigterm_argv,
    is_gone,
    parent_with_grandchild_argv,
    read_line,
    sigterm_deaf_argv,
    sleeper_argv,
    start,
)
from loguru import logger

from watchdog_async import (
    Backend,
    BackendStoppedError,
    DeviceMemory,
    Eviction,
    EvictionReason,
    MemoryProbe,
    MemoryReading,
    Supervisor,
)
from watchdog_async.testing import ScriptedProbe, gib, settle

if TYPE_CHECKING:
    from loguru import Record

WARNING = 30
QUIET = 3600.0  # check_interval where the periodic check must not interfere
_addresses = itertools.count()


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[list[Record]]:
    """Every record watchdog_async logs during the test (logging is off by default)."""
    records: list[Record] = []
    logger.enable("watchdog_async")
    sink = logger.add(
        lambda message: records.append(message.record),
        level="DEBUG",
        format="{message}",
        backtrace=False,
        diagnose=False,
    )
    try:
        yield records
    finally:
        logger.remove(sink)
        logger.disable("watchdog_async")


def tracebacks(records: list[Record]) -> list[Record]:
    """WARNING-or-worse records that carry a traceback (the fault itself, logged)."""
    return [r for r in records if r["level"].no >= WARNING and r["exception"] is not None]


class Shutdown:
    """A shutdown callback that can raise, hang, or be slow; healthy by default."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.error: BaseException | None = None
        self.hang = False
        self.delay = 0.0
        self.cancelled = 0
        self.stops_process = False
        self.gate: anyio.Event | None = None  # when set: the callback waits for it

    async def __call__(self, backend: Backend) -> None:
        self.calls.append(backend.address)
        try:
            if self.stops_process and backend.pid is not None:
                psutil.Process(backend.pid).terminate()  # the graceful way: it exits meanwhile
            if self.delay:
                await anyio.sleep(self.delay)
            if self.gate is not None:
                await self.gate.wait()
            if self.hang:
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error

    def heal(self) -> None:
        self.error, self.hang, self.delay, self.stops_process = None, False, 0.0, False
        self.gate = None


@pytest.fixture
def shutdown() -> Shutdown:
    return Shutdown()


class Children:
    """Child processes of the test: killed if still there, and reaped, at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[str]] = []
        self.others: list[int] = []

    async def ready(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = start(argv)
        self.popens.append(proc)
        assert await read_line(proc) == "ready"
        return proc

    def close(self) -> None:
        for pid in self.others:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        for proc in self.popens:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    owned = Children()
    yield owned
    owned.close()


def fresh() -> str:
    return f"127.0.0.1:{9000 + next(_addresses)}"


def assert_consistent(sup: Supervisor) -> None:
    """Nothing in flight, nothing waiting, nothing half-stopped."""
    snapshot = sup.snapshot()
    assert sup.loaded_count == len(snapshot)
    for status in snapshot:
        assert (status.inflight, status.waiting, status.stopping) == (0, 0, False), status


async def assert_still_works(sup: Supervisor, shutdown: Shutdown) -> None:
    """Register, call and evict a new backend; the callback is healthy again."""
    shutdown.heal()
    address = fresh()
    sup.register(address, "check")
    async with sup.busy(address) as call:
        call.progress()
        assert [s.inflight for s in sup.snapshot() if s.address == address] == [1]
    eviction = await sup.evict(address)
    assert (eviction.address, eviction.ok, eviction.error) == (address, True, None)
    assert address not in {s.address for s in sup.snapshot()}
    assert_consistent(sup)


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polls what the supervisor counts
            await anyio.sleep(0.01)


async def next_event(stream: AsyncIterator[Eviction], within: float = 5.0) -> Eviction:
    with anyio.fail_after(within):
        return await stream.__anext__()


# -- shutdown callbacks ------------------------------------------------------------------------


async def test_callback_that_raises_is_reported_and_the_backend_stays(
    shutdown: Shutdown, logs: list[Record]
) -> None:
    async with Supervisor(shutdown=shutdown, check_interval=QUIET) as sup:
        events = sup.events()
        sup.register("a", "m")
        error = RuntimeError("cannot unload")
        shutdown.error = error
        first = await sup.evict("a")
        assert (first.ok, first.error, first.reason) == (False, error, EvictionReason.MANUAL)
        assert await next_event(events) is first
        assert sup.faults == {"stop: RuntimeError": 1}
        assert_consistent(sup)
        assert [s.address for s in sup.snapshot()] == ["a"]  # still tracked and counted
        async with sup.busy("a"):  # and it takes calls again
            pass
        second = await sup.evict("a")  # tried again, fails again
        assert second.error is error
        assert sup.faults == {"stop: RuntimeError": 2}
        shutdown.heal()
        third = await sup.evict("a")
        assert third.ok and sup.loaded_count == 0
        assert shutdown.calls == ["a", "a", "a"]
        await assert_still_works(sup, shutdown)


async def test_a_failing_callback_is_logged_once(shutdown: Shutdown, logs: list[Record]) -> None:
    async with Supervisor(shutdown=shutdown, check_interval=QUIET, stop_on_exit=False) as sup:
        sup.register("a", "m")
        shutdown.error = RuntimeError("cannot unload")
        await sup.evict("a")
        assert len(tracebacks(logs)) == 1
        await sup.evict("a")
        assert len(tracebacks(logs)) == 1  # the same kind again: not logged again
        assert sup.faults == {"stop: RuntimeError": 2}


async def test_callback_that_hangs_is_cut_at_stop_timeout(
    shutdown: Shutdown, logs: list[Record]
) -> None:
    async with Supervisor(shutdown=shutdown, stop_timeout=0.05, check_interval=QUIET) as sup:
        sup.register("a", "m")
        shutdown.hang = True
        with anyio.fail_after(5):
            eviction = await sup.evict("a")
        assert not eviction.ok
        assert isinstance(eviction.error, TimeoutError)
        assert shutdown.cancelled == 1  # the callback was cancelled, not left running
        assert sup.faults == {"stop: TimeoutError": 1}
        assert len(tracebacks(logs)) == 1
        await sup.evict("a")
        assert sup.faults == {"stop: TimeoutError": 2}
        assert len(tracebacks(logs)) == 1  # logged once
        assert_consistent(sup)
        assert sup.loaded_count == 1
        await assert_still_works(sup, shutdown)
        assert (await sup.evict("a")).ok  # healthy again: the stuck one goes too


async def test_callback_that_hangs_with_a_process_still_stops_the_process(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(sleeper_argv())
    async with Supervisor(shutdown=shutdown, stop_timeout=0.1, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        shutdown.hang = True
        eviction = await sup.evict("a")
        # confirmed gone by signal: ok, and the callback's timeout is still reported
        assert eviction.ok and isinstance(eviction.error, TimeoutError)
        assert is_gone(proc.pid)
        assert sup.faults == {"stop: TimeoutError": 1}
        assert len(tracebacks(logs)) == 1
        assert sup.loaded_count == 0
        await assert_still_works(sup, shutdown)


async def test_slow_callback_blocks_nothing_but_its_own_backend(
    shutdown: Shutdown, logs: list[Record]
) -> None:
    async with Supervisor(shutdown=shutdown, stop_timeout=5, check_interval=QUIET) as sup:
        sup.register("a", "m")
        sup.register("b", "m")
        shutdown.gate = gate = anyio.Event()  # the callback takes as long as the test says
        results: list[Eviction] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(results, sup.evict("a")))
            await wait_until(lambda: shutdown.calls == ["a"])
            assert [s.stopping for s in sup.snapshot()] == [True, False]
            with pytest.raises(BackendStoppedError):
                async with sup.busy("a"):  # chosen for eviction: no new calls
                    pass
            async with sup.busy("b"):  # the others go on meanwhile
                sup.register("c", "m")
            tg.start_soon(lambda: _append(results, sup.evict("a")))  # joins the same stop
            await anyio.sleep(0.2)
            assert results == []
            gate.set()
        assert shutdown.calls == ["a"]
        assert results[0] is results[1]
        assert results[0].ok and results[0].duration >= 0.2
        assert sup.faults == {}
        assert tracebacks(logs) == []
        assert {s.address for s in sup.snapshot()} == {"b", "c"}
        await assert_still_works(sup, shutdown)


async def _append(results: list[Eviction], eviction: Any) -> None:
    results.append(await eviction)


# -- memory probes -------------------------------------------------------------------------------


class NonsenseProbe:
    """A probe whose read() returns whatever it is given, until it is healed."""

    def __init__(self, value: object, healthy: ScriptedProbe) -> None:
        self.value = value
        self.healthy = healthy
        self.healed = False

    def read(self) -> Any:
        return self.healthy.read() if self.healed else self.value


def gpu(used: float, total: float = 10, **kwargs: Any) -> DeviceMemory:
    return DeviceMemory(0, "gpu0", gib(total), gib(used), **kwargs)


NONSENSE: list[tuple[str, object]] = [
    ("None", None),
    ("a string", "80%"),
    ("a dict", {"used": 1, "total": 2}),
    ("a list of devices", [gpu(1)]),
    ("used above total", MemoryReading((gpu(12),))),
    ("negative used", MemoryReading((gpu(-1),))),
    ("total zero", MemoryReading((DeviceMemory(0, "gpu0", 0, 0),))),
    ("NaN used", MemoryReading((DeviceMemory(0, "gpu0", gib(10), math.nan),))),  # type: ignore[arg-type]
    ("infinite total", MemoryReading((DeviceMemory(0, "gpu0", math.inf, 1),))),  # type: ignore[arg-type]
    ("devices not a tuple", MemoryReading([gpu(1)])),  # type: ignore[arg-type]
    ("not a device", MemoryReading(("gpu0",))),  # type: ignore[arg-type]
    ("duplicate device", MemoryReading((gpu(1), gpu(2)))),
    ("negative process bytes", MemoryReading((gpu(1, processes={123: -5}),))),
]


def probe_cases() -> list[Any]:
    cases: list[Any] = [pytest.param("raises", None, id="raises")]
    cases.append(pytest.param("hangs", None, id="hangs past probe_timeout"))
    cases += [pytest.param("nonsense", value, id=f"returns {name}") for name, value in NONSENSE]
    return cases


@pytest.mark.parametrize(("fault", "value"), probe_cases())
async def test_probe_fault_is_reported_logged_once_and_recovered_from(
    fault: str, value: object, shutdown: Shutdown, logs: list[Record]
) -> None:
    loaded = {"a"}  # what the healthy reading is derived from
    healthy = ScriptedProbe(lambda: MemoryReading((gpu(2 + 6 * len(loaded)),)))
    probe: Any
    if fault == "nonsense":
        probe = NonsenseProbe(value, healthy)
    else:
        probe = healthy
        if fault == "raises":
            healthy.error = RuntimeError("NVML: GPU is lost")
        else:
            healthy.hang = 0.3
    expected = {
        "raises": "memory probe: RuntimeError",
        "hangs": "memory probe: TimeoutError",
        "nonsense": "memory probe: ValueError",
    }[fault]

    async def unload(backend: Backend) -> None:
        await shutdown(backend)
        loaded.discard(backend.address)

    sup = Supervisor(
        shutdown=unload,
        memory_probe=cast(MemoryProbe, probe),
        memory_threshold=0.5,
        check_interval=0.02,
        probe_timeout=0.05,
        memory_recovery_timeout=0.5,
    )
    async with sup:
        sup.register("a", "m")
        # the reclaimer runs every 20 ms and fails every time
        await wait_until(lambda: sup.faults.get(expected, 0) >= 3)
        assert set(sup.faults) == {expected}
        assert len(tracebacks(logs)) == 1  # logged once, however often it happens
        assert sup.loaded_count == 1  # nothing evicted on a failed reading
        assert_consistent(sup)
        await assert_still_works(sup, shutdown)

        # recovery: a good reading over the threshold evicts 'a' (8 of 10 GiB in use)
        events = sup.events()
        healthy.error, healthy.hang = None, 0.0
        if isinstance(probe, NonsenseProbe):
            probe.healed = True
        eviction = await next_event(events)
        assert (eviction.address, eviction.reason, eviction.ok) == (
            "a",
            EvictionReason.MEMORY,
            True,
        )
        assert sup.loaded_count == 0
        assert len(tracebacks(logs)) == 1
        await assert_still_works(sup, shutdown)


# -- processes -------------------------------------------------------------------------------


async def test_process_that_ignores_sigterm_is_killed_and_logged_once(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(sigterm_deaf_argv())
    async with Supervisor(shutdown=shutdown, stop_timeout=0.2, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        eviction = await sup.evict("a")
        assert eviction.ok and eviction.error is None
        assert eviction.duration >= 0.2  # it waited out the grace period, then SIGKILL
        assert is_gone(proc.pid)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        warnings = [r for r in logs if r["level"].no >= WARNING]
        assert len(warnings) == 1 and "SIGKILL" in warnings[0]["message"]
        assert sup.loaded_count == 0
        await assert_still_works(sup, shutdown)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(parent_with_grandchild_argv(), id="parent and child"),
        pytest.param(
            parent_with_grandchild_argv(parent_deaf=True, child_deaf=True), id="both deaf"
        ),
    ],
)
async def test_process_tree_is_stopped_whole(
    argv: list[str], shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = start(argv)
    children.popens.append(proc)
    parent, child = (int(pid) for pid in (await read_line(proc)).split())
    children.others.append(child)
    async with Supervisor(shutdown=shutdown, stop_timeout=0.2, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        eviction = await sup.evict("a")
        assert eviction.ok and eviction.error is None
        assert is_gone(parent) and is_gone(child)
        assert tracebacks(logs) == []
        assert sup.faults == {}
        await assert_still_works(sup, shutdown)


async def test_process_that_forks_during_the_stop_loses_its_new_child_too(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(forks_on_sigterm_argv())
    async with Supervisor(shutdown=shutdown, stop_timeout=0.3, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        eviction = await sup.evict("a")
        forked = int(await read_line(proc))  # printed by its SIGTERM handler
        children.others.append(forked)
        assert eviction.ok and eviction.error is None
        assert is_gone(proc.pid) and is_gone(forked)
        assert sup.faults == {}
        await assert_still_works(sup, shutdown)


async def test_process_that_exits_in_the_middle_of_the_stop(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(exits_after_sigterm_argv(0.1))
    async with Supervisor(shutdown=shutdown, stop_timeout=5, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        eviction = await sup.evict("a")
        assert eviction.ok and eviction.error is None
        assert eviction.duration < 5  # gone on its own during the grace period: no SIGKILL
        assert proc.wait(timeout=5) == 0
        assert [r for r in logs if r["level"].no >= WARNING] == []
        await assert_still_works(sup, shutdown)


async def test_callback_whose_process_exits_during_it(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(sleeper_argv())
    async with Supervisor(shutdown=shutdown, stop_timeout=5, check_interval=QUIET) as sup:
        sup.register("a", "m", process=proc)
        shutdown.stops_process, shutdown.delay = True, 0.2
        eviction = await sup.evict("a")
        assert eviction.ok and eviction.error is None
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert sup.faults == {} and tracebacks(logs) == []
        await assert_still_works(sup, shutdown)


async def test_process_that_dies_under_a_call_fails_the_call_and_is_untracked(
    shutdown: Shutdown, children: Children, logs: list[Record]
) -> None:
    proc = await children.ready(sleeper_argv())
    async with Supervisor(shutdown=shutdown, check_interval=0.02) as sup:
        events = sup.events()
        sup.register("a", "m", process=proc)
        caught: list[BackendStoppedError] = []

        async def call() -> None:
            try:
                async with sup.busy("a"):
                    await anyio.sleep_forever()
            except BackendStoppedError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            proc.kill()  # it crashes
            eviction = await next_event(events)
        assert (eviction.reason, eviction.ok) == (EvictionReason.EXITED, True)
        assert [e.reason for e in caught] == [EvictionReason.EXITED]
        assert shutdown.calls == []  # nothing to stop: it is gone
        assert sup.loaded_count == 0
        await assert_still_works(sup, shutdown)


# -- events ----------------------------------------------------------------------------------


async def test_subscriber_that_never_reads_costs_a_bounded_buffer(shutdown: Shutdown) -> None:
    async with Supervisor(shutdown=shutdown, check_interval=QUIET) as sup:
        idle = sup.events(buffer=10)  # never read until the end
        reader = sup.events(buffer=1000)
        abandoned = weakref.ref(sup.events(buffer=10))  # nobody holds it at all
        gc.collect()
        assert abandoned() is None  # the supervisor does not keep it alive
        read: list[Eviction] = []

        async def read_all() -> None:
            async for eviction in reader:
                read.append(eviction)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            published: list[Eviction] = []
            with anyio.fail_after(10):  # the idle subscriber blocks nothing
                for number in range(200):
                    address = f"b{number}"
                    sup.register(address, "m")
                    published.append(await sup.evict(address))
            await settle(sup)
            await wait_until(lambda: len(read) == 200)
            await reader.aclose()
        assert read == published and reader.dropped == 0
        assert idle.dropped == 190
        await idle.aclose()
        buffered = [e async for e in idle]
        assert buffered == published[-10:]  # the newest kept, the oldest dropped
        await assert_still_works(sup, shutdown)
