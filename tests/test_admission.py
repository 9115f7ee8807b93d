"""Admission control: per-backend ``max_concurrency`` with a bounded FIFO queue of waiters.

FIFO order with no barging, ``max_waiting`` overflow, ``wait_timeout``, cancellation while
waiting, waiters failed by evictions, waiting that is not a use (busy timer, LRU order,
``snapshot().waiting``), per-backend limits, live changes of the limit, and unlimited backends.
Supervisor time is a ManualClock; ``wait_timeout`` (loop time) runs under looptime."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import looptime
import pytest
from _children import read_line, sleeper_argv, start
from _support import OpenSup, Recorder

from watchdog_async import (
    BackendBusyError,
    BackendStatus,
    BackendStoppedError,
    BusyHandle,
    ConfigError,
    EvictionReason,
    Supervisor,
    UnknownBackendError,
    WatchdogError,
)
from watchdog_async.testing import ManualClock, settle

A, B, C, D = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004"

LOOPTIME = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("asyncio", {"loop_factory": looptime.new_event_loop}), id="looptime")],
)


async def blocked() -> None:
    """``anyio.wait_all_tasks_blocked()``, after letting the tasks just woken (callers, the
    supervisor's consumer) run, so that it returns at once instead of polling every 0.1 s."""
    for _ in range(4):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


def status(sup: Supervisor, address: str) -> BackendStatus:
    (row,) = [s for s in sup.snapshot() if s.address == address]
    return row


class Calls:
    """busy() calls run in tasks of ``tg``, each held inside until let go; records what
    happened to each (entry order, the error it got, how many were inside at once)."""

    def __init__(self, sup: Supervisor, tg: anyio.abc.TaskGroup) -> None:
        self.sup = sup
        self.tg = tg
        self.entered: list[str] = []
        self.inside: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.outcome: dict[str, str | BaseException] = {}
        self._release: dict[str, anyio.Event] = {}
        self._done: dict[str, anyio.Event] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}

    async def start(
        self, name: str, address: str = A, *, wait_timeout: float | None = None
    ) -> None:
        """Start a call and wait until it is inside busy() or waiting (or done)."""
        self._release[name] = anyio.Event()
        self._done[name] = anyio.Event()
        self.tg.start_soon(self._run, name, address, wait_timeout)
        await blocked()

    async def _run(self, name: str, address: str, wait_timeout: float | None) -> None:
        try:
            await self._call(name, address, wait_timeout)
        finally:
            self._done[name].set()

    async def _call(self, name: str, address: str, wait_timeout: float | None) -> None:
        with anyio.CancelScope() as scope:
            self._scopes[name] = scope
            try:
                async with self.sup.busy(address, wait_timeout=wait_timeout):
                    self.entered.append(name)
                    self.inside[address] = self.inside.get(address, 0) + 1
                    self.peak[address] = max(self.peak.get(address, 0), self.inside[address])
                    try:
                        await self._release[name].wait()
                    finally:
                        self.inside[address] -= 1
            except WatchdogError as exc:
                self.outcome[name] = exc
                return
        self.outcome[name] = "cancelled" if scope.cancelled_caught else "ok"

    async def wait_done(self, name: str) -> None:
        await self._done[name].wait()

    def let_go(self, *names: str) -> None:
        for name in names:
            self._release[name].set()

    def cancel(self, name: str) -> None:
        self._scopes[name].cancel()

    def error(self, name: str) -> BaseException:
        outcome = self.outcome[name]
        assert isinstance(outcome, BaseException), f"{name}: {outcome!r}"
        return outcome

    def stopped_reason(self, name: str) -> EvictionReason:
        error = self.error(name)
        assert isinstance(error, BackendStoppedError), repr(error)
        return error.reason


def refused_at_once(handle: BusyHandle) -> BaseException:
    """Enter ``handle`` and return the error it raised without ever suspending (a caller
    that would have waited fails the test)."""
    coro = handle.__aenter__()
    try:
        coro.send(None)
    except StopIteration:
        pytest.fail("busy() admitted the call")
    except WatchdogError as exc:
        return exc
    coro.close()  # it suspended: it would have waited
    pytest.fail("busy() waited instead of failing at once")


# -- FIFO --------------------------------------------------------------------------------------


async def test_fifo_order_under_100_waiters_and_no_barging(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1, max_waiting=1000)
    sup.register(A, "m")
    order: list[str] = []
    inside = peak = 0
    holder_in, let_holder_go = anyio.Event(), anyio.Event()

    async def use(name: str) -> None:
        nonlocal inside, peak
        async with sup.busy(A):
            order.append(name)
            inside += 1
            peak = max(peak, inside)
            await anyio.lowlevel.checkpoint()  # others run while this one is inside: none may enter
            await anyio.lowlevel.checkpoint()
            inside -= 1

    async def waiter(i: int) -> None:
        await use(f"w{i}")
        # back again the instant its own slot frees, before the next waiter has run:
        # it must queue behind everyone already waiting
        await use(f"w{i}-again")

    async def holder() -> None:
        async with sup.busy(A):
            holder_in.set()
            await let_holder_go.wait()
        await use("holder-again")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await holder_in.wait()
        for i in range(100):
            tg.start_soon(waiter, i)
            await blocked()  # arrival order is start order
        row = status(sup, A)
        assert (row.inflight, row.waiting) == (1, 100)
        let_holder_go.set()
    assert order == [
        *(f"w{i}" for i in range(100)),
        "holder-again",
        *(f"w{i}-again" for i in range(100)),
    ]
    assert peak == 1
    row = status(sup, A)
    assert (row.inflight, row.waiting) == (0, 0)


async def test_a_newcomer_cannot_overtake_the_only_waiter(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    order: list[str] = []
    first_in, let_first_go = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with sup.busy(A):
            first_in.set()
            await let_first_go.wait()
        # the slot was just handed to the waiter, which has not run yet
        async with sup.busy(A):
            order.append("newcomer")

    async def waiter() -> None:
        async with sup.busy(A):
            order.append("waiter")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_in.wait()
        tg.start_soon(waiter)
        await blocked()
        let_first_go.set()
    assert order == ["waiter", "newcomer"]


async def test_limit_of_three_admits_in_order(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=3)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(8):
            await calls.start(f"c{i}")
        assert calls.entered == ["c0", "c1", "c2"]
        assert (status(sup, A).inflight, status(sup, A).waiting) == (3, 5)
        calls.let_go("c1")
        await blocked()
        assert calls.entered == ["c0", "c1", "c2", "c3"]
        calls.let_go("c0", "c2")
        await blocked()
        assert calls.entered[4:] == ["c4", "c5"]
        calls.let_go(*(f"c{i}" for i in range(8)))
    assert calls.entered == [f"c{i}" for i in range(8)]
    assert calls.peak[A] == 3
    assert all(calls.outcome[f"c{i}"] == "ok" for i in range(8))


async def test_an_error_inside_releases_the_slot(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom"):
            async with sup.busy(A):
                raise RuntimeError("boom")
    async with sup.busy(A):  # would wait for ever had a slot leaked
        assert status(sup, A).inflight == 1


# -- max_waiting -------------------------------------------------------------------------------


async def test_max_waiting_overflow_fails_at_once_and_leaves_the_queue(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1, max_waiting=3)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for name in ["holder", "w1", "w2", "w3"]:
            await calls.start(name)
        assert status(sup, A).waiting == 3
        for _ in range(5):
            error = refused_at_once(sup.busy(A))
            assert isinstance(error, BackendBusyError)
            assert error.address == A
            assert A in str(error)
        assert status(sup, A).waiting == 3  # the queue is unchanged
        assert status(sup, A).inflight == 1
        calls.let_go("holder", "w1", "w2", "w3")
    assert calls.entered == ["holder", "w1", "w2", "w3"]
    assert all(calls.outcome[n] == "ok" for n in ["holder", "w1", "w2", "w3"])


async def test_max_waiting_0_refuses_every_caller_past_the_limit(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=2, max_waiting=0)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("c0")
        await calls.start("c1")
        assert isinstance(refused_at_once(sup.busy(A)), BackendBusyError)
        calls.let_go("c0")
        await blocked()
        await calls.start("c2")  # a slot is free again: admitted
        assert calls.entered == ["c0", "c1", "c2"]
        calls.let_go("c1", "c2")


async def test_max_waiting_changed_live_applies_to_new_arrivals(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1, max_waiting=5)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for name in ["holder", "w1", "w2", "w3"]:
            await calls.start(name)
        sup.configure(max_waiting=2)  # already 3 waiting: they stay, newcomers are refused
        assert isinstance(refused_at_once(sup.busy(A)), BackendBusyError)
        assert status(sup, A).waiting == 3
        sup.configure(max_waiting=10)
        await calls.start("w4")
        assert status(sup, A).waiting == 4
        calls.let_go("holder", "w1", "w2", "w3", "w4")
    assert calls.entered == ["holder", "w1", "w2", "w3", "w4"]


# -- wait_timeout ------------------------------------------------------------------------------


@LOOPTIME
async def test_wait_timeout_expiry_is_busy_error_and_leaves_no_trace(
    open_sup: OpenSup, clock: ManualClock
) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    last_used = status(sup, A).last_used
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("impatient", wait_timeout=5)
        await calls.start("patient")
        assert status(sup, A).waiting == 2
        began = anyio.current_time()
        await calls.wait_done("impatient")
        assert anyio.current_time() - began == pytest.approx(5, abs=0.6)
        error = calls.error("impatient")
        assert isinstance(error, BackendBusyError)
        assert error.address == A
        assert status(sup, A).waiting == 1
        calls.let_go("holder")
        await blocked()
        assert calls.entered == ["holder", "patient"]  # the next waiter is still admitted
        calls.let_go("patient")
    assert "impatient" not in calls.entered
    # no slot leaked either way: exactly one caller in at a time again
    async with anyio.create_task_group() as tg:
        calls2 = Calls(sup, tg)
        await calls2.start("x")
        await calls2.start("y")
        assert calls2.entered == ["x"]
        calls2.let_go("x", "y")
    assert calls2.entered == ["x", "y"]
    assert status(sup, A).last_used >= last_used


@LOOPTIME
async def test_wait_timeout_not_reached_is_admitted(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("w", wait_timeout=10)
        await anyio.sleep(9)  # virtual time (looptime): no real wait
        calls.let_go("holder")
        await blocked()
        assert calls.entered == ["holder", "w"]
        await anyio.sleep(5)  # past its wait_timeout, but it is inside now: not cut short
        assert "w" not in calls.outcome
        calls.let_go("w")
    assert calls.outcome["w"] == "ok"


@LOOPTIME
async def test_wait_timeout_0(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with sup.busy(A, wait_timeout=0):  # a free slot: in at once
        began = anyio.current_time()
        with pytest.raises(BackendBusyError):
            async with sup.busy(A, wait_timeout=0):
                pytest.fail("admitted past the limit")
        assert anyio.current_time() == began
        assert status(sup, A).waiting == 0


@LOOPTIME
async def test_wait_timeout_as_a_duration_string(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with sup.busy(A):
        began = anyio.current_time()
        with pytest.raises(BackendBusyError):
            async with sup.busy(A, wait_timeout="1m30s"):
                pytest.fail("admitted past the limit")
        assert anyio.current_time() - began == pytest.approx(90, abs=1)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, True, "soon", "off", [1]])
async def test_bad_wait_timeout_is_a_config_error(open_sup: OpenSup, bad: object) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    with pytest.raises(ConfigError, match="wait_timeout"):
        sup.busy(A, wait_timeout=bad)  # type: ignore[arg-type]
    assert status(sup, A).waiting == 0


async def test_wait_timeout_is_ignored_without_a_limit(open_sup: OpenSup) -> None:
    sup = await open_sup()
    sup.register(A, "m")
    async with sup.busy(A, wait_timeout=0), sup.busy(A, wait_timeout=0):
        assert status(sup, A).inflight == 2


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_waiter_leaves_no_trace(open_sup: OpenSup, clock: ManualClock) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        clock.advance(5)
        await calls.start("w1")
        await calls.start("gone")
        await calls.start("w2")
        assert status(sup, A).waiting == 3
        last_used = status(sup, A).last_used
        calls.cancel("gone")
        await blocked()
        assert calls.outcome["gone"] == "cancelled"
        row = status(sup, A)
        assert (row.inflight, row.waiting, row.last_used) == (1, 2, last_used)
        calls.let_go("holder")
        await blocked()
        assert calls.entered == ["holder", "w1"]
        calls.let_go("w1")
        await blocked()
        assert calls.entered == ["holder", "w1", "w2"]  # the one behind it is still admitted
        calls.let_go("w2")
    assert "gone" not in calls.entered
    assert calls.peak[A] == 1
    row = status(sup, A)
    assert (row.inflight, row.waiting) == (0, 0)
    async with anyio.create_task_group() as tg:  # the slot count is exact again
        calls2 = Calls(sup, tg)
        await calls2.start("x")
        await calls2.start("y")
        assert calls2.entered == ["x"]
        calls2.let_go("x", "y")


async def test_every_waiter_cancelled_leaves_no_trace(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=2)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("h1")
        await calls.start("h2")
        for i in range(20):
            await calls.start(f"w{i}")
        for i in range(20):
            calls.cancel(f"w{i}")
        await blocked()
        assert status(sup, A).waiting == 0
        calls.let_go("h1", "h2")
    assert calls.entered == ["h1", "h2"]
    async with sup.busy(A), sup.busy(A):
        assert status(sup, A).inflight == 2


async def test_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on(
    open_sup: OpenSup,
) -> None:
    # asyncio's own Task.cancel(): the cancellation lands on the waiter's already-resolved
    # wait, so the waiter has been handed the slot and gives up at the same moment
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    entered: list[str] = []
    tasks: dict[str, asyncio.Task[None]] = {}
    release = {name: anyio.Event() for name in ["holder", "w1", "w2", "w3"]}

    async def call(name: str) -> None:
        async with sup.busy(A):
            entered.append(name)
            await release[name].wait()
        if name == "holder":  # the slot is now w1's, but w1 has not run yet
            tasks["w1"].cancel()

    for name in ["holder", "w1", "w2"]:
        tasks[name] = asyncio.create_task(call(name))
        await blocked()
    assert status(sup, A).waiting == 2
    release["holder"].set()
    await blocked()
    assert tasks["w1"].cancelled()
    assert entered == ["holder", "w2"]  # the slot went on to the next waiter
    assert (status(sup, A).inflight, status(sup, A).waiting) == (1, 0)
    tasks["w3"] = asyncio.create_task(call("w3"))
    await blocked()
    assert entered == ["holder", "w2"]  # and the limit still holds
    release["w2"].set()
    release["w3"].set()
    await asyncio.gather(tasks["holder"], tasks["w2"], tasks["w3"])
    assert entered == ["holder", "w2", "w3"]


# -- waiters failed by evictions ---------------------------------------------------------------


async def test_forced_evict_fails_waiters_at_once(open_sup: OpenSup, recorder: Recorder) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    recorder.gate = anyio.Event()  # the stop stays in progress
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for name in ["holder", "w1", "w2", "w3"]:
            await calls.start(name)
        evicted: list[Any] = []

        async def evict() -> None:
            evicted.append(await sup.evict(A, force=True))

        tg.start_soon(evict)
        await blocked()
        assert recorder.stopped == [A] and not evicted  # still stopping...
        for name in ["holder", "w1", "w2", "w3"]:  # ...and every caller already failed
            assert calls.stopped_reason(name) is EvictionReason.MANUAL
        assert status(sup, A).waiting == 0
        with pytest.raises(BackendStoppedError):
            async with sup.busy(A):
                pytest.fail("entered a backend being stopped")
        recorder.gate.set()
    assert calls.entered == ["holder"]
    assert evicted[0].ok
    assert sup.loaded_count == 0


async def test_busy_timeout_fails_waiters(open_sup: OpenSup, clock: ManualClock) -> None:
    sup = await open_sup(max_concurrency=1, busy_timeout=10)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("w1")
        await calls.start("w2")
        clock.advance(11)
        await settle(sup)
    for name in ["holder", "w1", "w2"]:
        assert calls.stopped_reason(name) is EvictionReason.BUSY_TIMEOUT
    assert calls.entered == ["holder"]
    assert sup.loaded_count == 0


async def test_forced_lru_eviction_fails_waiters(open_sup: OpenSup, clock: ManualClock) -> None:
    sup = await open_sup(max_concurrency=1, max_loaded=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("w1")
        evictions = await sup.make_room(force=True, timeout=0)
        assert [(e.address, e.reason) for e in evictions] == [(A, EvictionReason.LRU)]
    assert calls.stopped_reason("w1") is EvictionReason.LRU
    assert calls.stopped_reason("holder") is EvictionReason.LRU
    assert calls.entered == ["holder"]


async def test_a_backend_that_exits_fails_its_waiters(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    proc = start(sleeper_argv())
    try:
        assert await read_line(proc) == "ready"
        sup.register(A, "m", process=proc.pid)
        async with anyio.create_task_group() as tg:
            calls = Calls(sup, tg)
            await calls.start("holder")
            await calls.start("w1")
            await calls.start("w2")
            proc.kill()
            await anyio.to_thread.run_sync(proc.wait)
            await sup.check()
            await blocked()
            assert calls.stopped_reason("w1") is EvictionReason.EXITED
            assert calls.stopped_reason("w2") is EvictionReason.EXITED
        assert calls.stopped_reason("holder") is EvictionReason.EXITED
        assert calls.entered == ["holder"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def test_closing_fails_waiters(clock: ManualClock, recorder: Recorder) -> None:
    outcome: dict[str, BaseException] = {}
    holder_in = anyio.Event()

    async def call(sup: Supervisor, name: str) -> None:
        try:
            async with sup.busy(A):
                holder_in.set()
                await anyio.sleep_forever()
        except BackendStoppedError as exc:
            outcome[name] = exc

    async with (
        anyio.create_task_group() as tg,
        Supervisor(shutdown=recorder, clock=clock, max_concurrency=1) as sup,
    ):
        sup.register(A, "m")
        tg.start_soon(call, sup, "holder")
        await holder_in.wait()
        tg.start_soon(call, sup, "w1")
        await blocked()
        assert status(sup, A).waiting == 1
    assert outcome["w1"].reason is EvictionReason.CLOSING  # type: ignore[attr-defined]
    assert outcome["holder"].reason is EvictionReason.CLOSING  # type: ignore[attr-defined]


async def test_forget_lets_the_waiters_in(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("w1")
        await calls.start("w2")
        sup.forget(A)  # no longer tracked, so no longer limited: nobody is left waiting
        await blocked()
        assert calls.entered == ["holder", "w1", "w2"]
        with pytest.raises(UnknownBackendError):
            async with sup.busy(A):
                pass
        calls.let_go("holder", "w1", "w2")
    assert all(calls.outcome[n] == "ok" for n in ["holder", "w1", "w2"])


async def test_waiter_handed_the_slot_just_before_a_forced_evict(
    open_sup: OpenSup, recorder: Recorder
) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        holder_in, let_holder_go = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with sup.busy(A):
                holder_in.set()
                await let_holder_go.wait()
            await sup.evict(A, force=True)  # w1 holds the slot but has not run yet

        tg.start_soon(holder)
        await holder_in.wait()
        await calls.start("w1")
        let_holder_go.set()
        await blocked()
        calls.let_go("w1")
    assert calls.entered == []
    assert calls.stopped_reason("w1") is EvictionReason.MANUAL


async def test_waiter_handed_the_slot_just_before_an_idle_eviction(
    open_sup: OpenSup, clock: ManualClock
) -> None:
    sup = await open_sup(max_concurrency=1, idle_timeout=10)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        holder_in, let_holder_go = anyio.Event(), anyio.Event()
        evictions: list[Any] = []

        async def holder() -> None:
            async with sup.busy(A):
                holder_in.set()
                await let_holder_go.wait()
            # the backend is idle (w1 holds the slot but has not entered): idle past timeout
            clock.advance(11)
            evictions.extend(await sup.check())

        tg.start_soon(holder)
        await holder_in.wait()
        await calls.start("w1")
        let_holder_go.set()
        await blocked()
        calls.let_go("w1")
    assert [(e.address, e.reason) for e in evictions] == [(A, EvictionReason.IDLE_TIMEOUT)]
    assert calls.entered == []
    assert calls.stopped_reason("w1") is EvictionReason.IDLE_TIMEOUT


async def test_waiter_handed_the_slot_just_before_an_lru_eviction(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1, max_loaded=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        holder_in, let_holder_go = anyio.Event(), anyio.Event()
        evictions: list[Any] = []

        async def holder() -> None:
            async with sup.busy(A):
                holder_in.set()
                await let_holder_go.wait()
            evictions.extend(await sup.make_room(timeout=0))  # A looks idle: the LRU victim

        tg.start_soon(holder)
        await holder_in.wait()
        await calls.start("w1")
        let_holder_go.set()
        await blocked()
        calls.let_go("w1")
    assert [(e.address, e.reason) for e in evictions] == [(A, EvictionReason.LRU)]
    assert calls.entered == []
    assert calls.stopped_reason("w1") is EvictionReason.LRU


async def test_unforced_evict_fails_waiters_at_once(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1, eviction_timeout=60)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")
        await calls.start("w1")
        evicted: list[Any] = []

        async def evict() -> None:
            evicted.append(await sup.evict(A))

        tg.start_soon(evict)
        await blocked()
        # draining: the call in flight may finish, the waiter is refused now
        assert "w1" in calls.outcome
        calls.let_go("holder", "w1")
    assert calls.outcome["holder"] == "ok"
    assert calls.stopped_reason("w1") is EvictionReason.MANUAL
    assert calls.entered == ["holder"]
    assert evicted[0].ok


# -- waiting is not a use ----------------------------------------------------------------------


async def test_waiting_does_not_restart_the_busy_timer(
    open_sup: OpenSup, clock: ManualClock
) -> None:
    sup = await open_sup(max_concurrency=1, busy_timeout=10)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")  # busy from t=1000
        clock.advance(8)
        await calls.start("w1")  # arrives at t=1008: no progress, not in flight
        row = status(sup, A)
        assert row.busy_for == 8
        assert (row.inflight, row.waiting) == (1, 1)
        clock.advance(3)  # t=1011: 11 s since the holder's last progress
        await settle(sup)
    assert calls.stopped_reason("holder") is EvictionReason.BUSY_TIMEOUT
    assert calls.stopped_reason("w1") is EvictionReason.BUSY_TIMEOUT


async def test_an_admitted_waiters_busy_timer_starts_when_it_enters(
    open_sup: OpenSup, clock: ManualClock
) -> None:
    sup = await open_sup(max_concurrency=1, busy_timeout=10)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder")  # t=1000
        clock.advance(2)
        await calls.start("w1")  # waits from t=1002
        clock.advance(7)
        calls.let_go("holder")  # t=1009: w1 enters
        await blocked()
        assert calls.entered == ["holder", "w1"]
        clock.advance(6)  # t=1015: 13 s since w1 arrived, 6 s since it entered
        await settle(sup)
        assert sup.loaded_count == 1
        assert status(sup, A).busy_for == 6
        assert "w1" not in calls.outcome
        clock.advance(5)  # t=1020: 11 s since it entered
        await settle(sup)
        assert sup.loaded_count == 0
    assert calls.stopped_reason("w1") is EvictionReason.BUSY_TIMEOUT
    assert calls.outcome["holder"] == "ok"


async def test_waiting_is_not_a_use_for_lru(open_sup: OpenSup, clock: ManualClock) -> None:
    sup = await open_sup(max_concurrency=1, max_loaded=2)
    sup.register(A, "a")
    clock.advance(1)
    sup.register(B, "b")  # t=1001
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder", A)  # t=1001: A used
        clock.advance(1)
        sup.touch(B)  # t=1002: B used more recently
        clock.advance(1)
        await calls.start("w1", A)  # t=1003: waiting on A is not a use
        clock.advance(1)
        assert [s.address for s in sup.snapshot()] == [A, B]
        assert status(sup, A).last_used == 1001
        assert status(sup, A).waiting == 1
        calls.let_go("holder")  # t=1004: the holder leaves and w1 enters: both uses
        await blocked()
        assert calls.entered == ["holder", "w1"]
        assert [s.address for s in sup.snapshot()] == [B, A]
        assert status(sup, A).last_used == 1004
        calls.let_go("w1")


async def test_waiters_keep_a_busy_backend_out_of_lru_choice_only_by_its_calls(
    open_sup: OpenSup, clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_concurrency=1, max_loaded=2)
    sup.register(A, "a")
    clock.advance(1)
    sup.register(B, "b")
    clock.advance(1)
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("holder", B)
        await calls.start("w1", B)
        sup.touch(A)  # A is now the most recent, but idle; B is busy with a waiter
        evictions = await sup.make_room(timeout=0)
        assert [e.address for e in evictions] == [A]  # busy B is skipped, waiters or not
        assert status(sup, B).waiting == 1
        calls.let_go("holder", "w1")
    assert calls.entered == ["holder", "w1"]


async def test_snapshot_counts_waiting_per_backend(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "a")
    sup.register(B, "b")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        await calls.start("a0", A)
        for i in range(3):
            await calls.start(f"a{i + 1}", A)
        await calls.start("b0", B)
        assert {s.address: (s.inflight, s.waiting) for s in sup.snapshot()} == {
            A: (1, 3),
            B: (1, 0),
        }
        calls.let_go("a0")
        await blocked()
        assert (status(sup, A).inflight, status(sup, A).waiting) == (1, 2)
        calls.let_go("a1", "a2", "a3", "b0")


# -- per-backend limits ------------------------------------------------------------------------


async def test_per_backend_limit_overrides_the_global_one(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    assert sup.register(A, "a", max_concurrency=3).max_concurrency == 3
    sup.register(B, "b", max_concurrency=None)  # unlimited, whatever the global setting
    sup.register(C, "c")  # inherits 1
    sup.register(D, "d", max_concurrency=2)
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for address, n in [(A, 5), (B, 50), (C, 3), (D, 4)]:
            for i in range(n):
                await calls.start(f"{address}-{i}", address)
        inflight = {s.address: (s.inflight, s.waiting) for s in sup.snapshot()}
        assert inflight == {A: (3, 2), B: (50, 0), C: (1, 2), D: (2, 2)}
        for name in list(calls._release):
            calls.let_go(name)
    assert calls.peak == {A: 3, B: 50, C: 1, D: 2}


async def test_per_backend_limits(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    backend = sup.register(A, "a", max_concurrency=3)
    assert backend.max_concurrency == 3
    assert sup.register(B, "b", max_concurrency=None).max_concurrency is None
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(5):
            await calls.start(f"a{i}", A)
        for i in range(50):
            await calls.start(f"b{i}", B)
        assert (status(sup, A).inflight, status(sup, A).waiting) == (3, 2)
        assert (status(sup, B).inflight, status(sup, B).waiting) == (50, 0)
        for name in list(calls.entered):
            calls.let_go(name)
        await blocked()
        calls.let_go("a3", "a4")
    assert calls.peak == {A: 3, B: 50}


async def test_global_limit_changes_do_not_touch_per_backend_ones(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "a", max_concurrency=1)
    sup.register(B, "b", max_concurrency=None)
    sup.register(C, "c")
    sup.configure(max_concurrency=5)
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for address in (A, B, C):
            for i in range(3):
                await calls.start(f"{address}-{i}", address)
        inflight = {s.address: (s.inflight, s.waiting) for s in sup.snapshot()}
        assert inflight == {A: (1, 2), B: (3, 0), C: (3, 0)}
        for name in list(calls._release):
            calls.let_go(name)


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.5, 2.0, "0", "two", ""])
async def test_bad_per_backend_limit(open_sup: OpenSup, bad: object) -> None:
    sup = await open_sup()
    with pytest.raises(ConfigError, match="max_concurrency"):
        sup.register(A, "a", max_concurrency=bad)
    assert sup.loaded_count == 0


async def test_per_backend_limit_is_a_number_not_a_string(open_sup: OpenSup) -> None:
    """Strings are for the environment (Settings.from_env); register() takes numbers."""
    sup = await open_sup(max_concurrency=1)
    for text in ("2", "off"):
        with pytest.raises(ConfigError):
            sup.register(A, "a", max_concurrency=text)
    assert sup.register(A, "a", max_concurrency=2).max_concurrency == 2
    assert sup.register(B, "b", max_concurrency=None).max_concurrency is None
    async with sup.busy(A), sup.busy(A), sup.busy(B), sup.busy(B), sup.busy(B):
        assert [(s.inflight, s.waiting) for s in sup.snapshot()] == [(2, 0), (3, 0)]


# -- live changes ------------------------------------------------------------------------------


async def test_raising_the_limit_admits_waiters_in_order(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(6):
            await calls.start(f"c{i}")
        assert calls.entered == ["c0"]
        sup.configure(max_concurrency=3)
        await blocked()
        assert calls.entered == ["c0", "c1", "c2"]
        assert (status(sup, A).inflight, status(sup, A).waiting) == (3, 3)
        calls.let_go("c0")
        await blocked()
        assert calls.entered == ["c0", "c1", "c2", "c3"]
        calls.let_go(*(f"c{i}" for i in range(6)))
    assert calls.peak[A] == 3


async def test_removing_the_limit_admits_everyone(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(10):
            await calls.start(f"c{i}")
        sup.configure(max_concurrency=None)
        await blocked()
        assert calls.entered == [f"c{i}" for i in range(10)]
        await calls.start("late")  # no limit any more: in at once
        assert (status(sup, A).inflight, status(sup, A).waiting) == (11, 0)
        calls.let_go(*(f"c{i}" for i in range(10)), "late")
    assert all(v == "ok" for v in calls.outcome.values())


async def test_limit_removed_then_set_again(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    sup.configure(max_concurrency=None)
    sup.configure(max_concurrency=2)
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(4):
            await calls.start(f"c{i}")
        assert calls.entered == ["c0", "c1"]
        calls.let_go("c0", "c1", "c2", "c3")
    assert calls.peak[A] == 2


async def test_lowering_the_limit_holds_waiters_until_below_it(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=3)
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(5):
            await calls.start(f"c{i}")
        assert calls.entered == ["c0", "c1", "c2"]
        sup.configure(max_concurrency=1)
        calls.let_go("c0")
        await blocked()
        assert status(sup, A).inflight == 2  # still over the new limit: nobody admitted
        calls.let_go("c1", "c2")
        await blocked()
        assert calls.entered == ["c0", "c1", "c2", "c3"]  # now one, in order
        calls.let_go("c3", "c4")
    assert calls.entered == [f"c{i}" for i in range(5)]


async def test_setting_a_limit_counts_the_calls_in_flight(open_sup: OpenSup) -> None:
    sup = await open_sup()
    sup.register(A, "m")
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(3):
            await calls.start(f"c{i}")
        sup.configure(max_concurrency=1)
        await calls.start("late")
        assert calls.entered == ["c0", "c1", "c2"]  # 3 in flight already: it waits
        assert status(sup, A).waiting == 1
        calls.let_go("c0", "c1")
        await blocked()
        assert calls.entered == ["c0", "c1", "c2"]  # still 1 in flight: at the limit
        calls.let_go("c2")
        await blocked()
        assert calls.entered == ["c0", "c1", "c2", "late"]
        calls.let_go("late")


# -- unlimited backends, other entry points ---------------------------------------------------


async def test_unlimited_backends_have_no_limiter(open_sup: OpenSup) -> None:
    sup = await open_sup()
    sup.register(A, "m")
    assert sup._registry.records[A].limiter is None  # the busy() hot path pays nothing
    async with anyio.create_task_group() as tg:
        calls = Calls(sup, tg)
        for i in range(200):
            await calls.start(f"c{i}")
        row = status(sup, A)
        assert (row.inflight, row.waiting) == (200, 0)
        for i in range(200):
            calls.let_go(f"c{i}")
    assert calls.peak[A] == 200
    sup.configure(max_concurrency=2)
    assert sup._registry.records[A].limiter is not None
    sup.configure(max_concurrency=None)
    assert sup._registry.records[A].limiter is None


async def test_busy_sync_waits_for_a_slot(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    sup.register(A, "m")
    order: list[str] = []

    def in_thread() -> None:
        with sup.busy_sync(A):
            order.append("thread")

    async with anyio.create_task_group() as tg, sup.busy(A):
        order.append("loop")
        tg.start_soon(anyio.to_thread.run_sync, in_thread)
        with anyio.fail_after(10):
            # a worker thread is waiting: nothing to wait on but the count itself
            while status(sup, A).waiting != 1:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        assert order == ["loop"]
    assert order == ["loop", "thread"]
    await settle(sup)
    assert (status(sup, A).inflight, status(sup, A).waiting) == (0, 0)


async def test_acquire_respects_the_limit(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    starts: list[str] = []
    inside = peak = 0
    release = anyio.Event()

    async def start_backend(model: str) -> tuple[str, None]:
        starts.append(model)
        return A, None

    async def use() -> None:
        nonlocal inside, peak
        async with sup.acquire("m", start_backend) as backend:
            assert backend.address == A
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(use)
        await blocked()
        assert inside == 1
        assert status(sup, A).waiting == 3
        release.set()
    assert starts == ["m"]
    assert peak == 1


async def test_busy_on_unknown_or_stopped_backend_is_not_queued(open_sup: OpenSup) -> None:
    sup = await open_sup(max_concurrency=1)
    with pytest.raises(UnknownBackendError):
        async with sup.busy(A):
            pass
    sup.register(A, "m")
    await sup.evict(A)
    with pytest.raises(UnknownBackendError):
        async with sup.busy(A):
            pass
