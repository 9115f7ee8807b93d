"""``sup.busy_sync(address)``: the busy accounting of ``busy()`` for sync code in worker threads
(``anyio.to_thread.run_sync`` and plain ``threading.Thread``), posted to the loop thread-safely.

The clock is a ManualClock moved from the loop thread only; threads are synchronised with
``threading.Event`` (waited for from the loop through a worker thread, never by sleeping).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _support import Recorder

from watchdog_async import (
    BackendStatus,
    BackendStoppedError,
    BusyHandle,
    EvictionReason,
    Supervisor,
    SupervisorClosedError,
    UnknownBackendError,
)
from watchdog_async.testing import ManualClock, settle

WAIT = 10.0  # seconds a thread waits for the test's signal at most (a bound, not a wait)


class Worker:
    """Sync code that enters ``busy_sync``, says it is inside, and waits to be let go.

    ``body`` runs inside (in the thread) after the signal, with the handle.
    """

    def __init__(
        self, sup: Supervisor, address: str, body: Callable[[BusyHandle], object] | None = None
    ) -> None:
        self.sup = sup
        self.address = address
        self.body = body
        self.inside = threading.Event()
        self.release = threading.Event()
        self.progress_now = threading.Event()
        self.progressed = threading.Event()
        self.thread_ident: int | None = None

    def __call__(self) -> object:
        self.thread_ident = threading.get_ident()
        with self.sup.busy_sync(self.address) as handle:
            assert handle.address == self.address
            self.inside.set()
            while not self.release.wait(0.01):  # poll for a progress request meanwhile
                if self.progress_now.is_set():
                    self.progress_now.clear()
                    handle.progress()
                    self.progressed.set()
            if self.body is not None:
                return self.body(handle)
        return "done"

    async def wait_inside(self) -> None:
        assert await anyio.to_thread.run_sync(self.inside.wait, WAIT)

    async def progress(self) -> None:
        """Make the thread call ``handle.progress()`` and wait until it has."""
        self.progress_now.set()
        assert await anyio.to_thread.run_sync(self.progressed.wait, WAIT)
        self.progressed.clear()


def row(sup: Supervisor, address: str) -> BackendStatus:
    rows = {r.address: r for r in sup.snapshot()}
    assert address in rows, f"{address} is not registered"
    return rows[address]


@contextmanager
def released(*workers: Worker) -> Iterator[None]:
    """Let the workers go however the block ends (a failed assertion must not hang a thread)."""
    try:
        yield
    finally:
        for worker in workers:
            worker.release.set()


# -- accounting -------------------------------------------------------------------------------


async def test_to_thread_call_is_counted_while_inside_and_its_exit_recorded(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    sup.register("b", "model-b")  # "a" is now the least recently used
    worker = Worker(sup, "a")
    result: list[object] = []

    async def run() -> None:
        result.append(await anyio.to_thread.run_sync(worker))

    async with anyio.create_task_group() as tg:
        with released(worker):
            tg.start_soon(run)
            await worker.wait_inside()
            assert worker.thread_ident != threading.get_ident()
            clock.advance(5)
            inside = row(sup, "a")
            assert (inside.inflight, inside.busy_for, inside.idle_for) == (1, 5.0, None)
            assert [r.address for r in sup.snapshot()] == ["b", "a"]  # entering is a use
            clock.advance(2)
    assert result == ["done"]
    after = row(sup, "a")  # no settle: the exit was posted before the thread's result
    assert (after.inflight, after.busy_for, after.idle_for) == (0, None, 0.0)
    assert after.last_used == 1007.0  # the exit is the last use


async def test_plain_threads_are_counted_together(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    workers = [Worker(sup, "a") for _ in range(4)]
    threads = [threading.Thread(target=w) for w in workers]
    with released(*workers):
        for thread in threads:
            thread.start()
        for worker in workers:
            await worker.wait_inside()
        assert row(sup, "a").inflight == 4
        workers[0].release.set()
        await anyio.to_thread.run_sync(threads[0].join, WAIT)
        assert row(sup, "a").inflight == 3
    for thread in threads:
        await anyio.to_thread.run_sync(thread.join, WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert row(sup, "a").inflight == 0


async def test_progress_from_the_thread_restarts_the_busy_timer(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup: Supervisor = await open_sup(busy_timeout=10)
    sup.register("a", "model-a")
    worker = Worker(sup, "a")
    async with anyio.create_task_group() as tg:
        with released(worker):
            tg.start_soon(anyio.to_thread.run_sync, worker)
            await worker.wait_inside()
            clock.advance(8)
            await worker.progress()
            clock.advance(8)  # 16 s in flight, 8 s since the progress
            await settle(sup)
            assert row(sup, "a").busy_for == 8.0
            assert not row(sup, "a").stopping
    await settle(sup)
    assert row(sup, "a").inflight == 0


# -- errors -----------------------------------------------------------------------------------


async def test_an_exception_in_the_thread_body_passes_through(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    error = ValueError("inference failed")

    def body(handle: BusyHandle) -> object:
        raise error

    worker = Worker(sup, "a", body)
    worker.release.set()
    with pytest.raises(ValueError, match="inference failed") as caught:
        await anyio.to_thread.run_sync(worker)
    assert caught.value is error
    assert row(sup, "a").inflight == 0
    assert not row(sup, "a").stopping


async def test_a_forced_eviction_fails_the_thread_when_it_leaves(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    """A thread cannot be interrupted: the eviction completes while it is inside, and the call
    raises BackendStoppedError as the thread leaves."""
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    worker = Worker(sup, "a")
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await anyio.to_thread.run_sync(worker)
        except BackendStoppedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        with released(worker):
            tg.start_soon(run)
            await worker.wait_inside()
            eviction = await sup.evict("a", force=True)
            assert eviction.ok
            assert recorder.stopped == ["a"]
            assert sup.snapshot() == []
            assert not outcome  # still inside: nothing raised yet
    (error,) = outcome
    assert isinstance(error, BackendStoppedError)
    assert (error.address, error.reason) == ("a", EvictionReason.MANUAL)


async def test_a_hung_thread_is_stopped_after_busy_timeout(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup: Supervisor = await open_sup(busy_timeout=10)
    sup.register("a", "model-a")
    worker = Worker(sup, "a")
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await anyio.to_thread.run_sync(worker)
        except BackendStoppedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        with released(worker):
            tg.start_soon(run)
            await worker.wait_inside()
            clock.advance(9)
            await settle(sup)
            assert recorder.stopped == []
            clock.advance(2)
            await settle(sup)
            assert recorder.stopped == ["a"]
            assert sup.snapshot() == []
    (error,) = outcome
    assert isinstance(error, BackendStoppedError)
    assert error.reason is EvictionReason.BUSY_TIMEOUT


async def test_the_bodys_own_error_wins_over_a_forced_eviction(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    error = ValueError("inference failed")

    def body(handle: BusyHandle) -> object:
        raise error

    worker = Worker(sup, "a", body)
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await anyio.to_thread.run_sync(worker)
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        with released(worker):
            tg.start_soon(run)
            await worker.wait_inside()
            await sup.evict("a", force=True)
    assert outcome == [error]


async def test_on_the_event_loop_thread_it_raises_runtime_error(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    with pytest.raises(RuntimeError, match="worker threads"), sup.busy_sync("a"):
        pytest.fail("entered busy_sync on the event loop thread")
    assert row(sup, "a").inflight == 0


async def test_an_unknown_address_raises_in_the_thread(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    worker = Worker(sup, "nowhere")
    worker.release.set()
    with pytest.raises(UnknownBackendError):
        await anyio.to_thread.run_sync(worker)
    assert not worker.inside.is_set()


async def test_a_backend_being_stopped_refuses_the_thread_at_once(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup: Supervisor = await open_sup()
    sup.register("a", "model-a")
    recorder.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.evict, "a")
        await anyio.wait_all_tasks_blocked()
        assert row(sup, "a").stopping
        worker = Worker(sup, "a")
        worker.release.set()
        with pytest.raises(BackendStoppedError) as caught:
            await anyio.to_thread.run_sync(worker)
        assert caught.value.reason is EvictionReason.MANUAL
        assert not worker.inside.is_set()
        recorder.gate.set()


async def test_the_concurrency_limit_holds_threads_back(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup(max_concurrency=1)
    sup.register("a", "model-a")
    first, second = Worker(sup, "a"), Worker(sup, "a")
    async with anyio.create_task_group() as tg:
        with released(first, second):
            tg.start_soon(anyio.to_thread.run_sync, first)
            await first.wait_inside()
            tg.start_soon(anyio.to_thread.run_sync, second)
            await anyio.wait_all_tasks_blocked()
            while row(sup, "a").waiting == 0:  # the second thread's entry reaches the loop
                await anyio.to_thread.run_sync(second.inside.wait, 0.01)
            assert (row(sup, "a").inflight, row(sup, "a").waiting) == (1, 1)
            assert not second.inside.is_set()
            first.release.set()
            await second.wait_inside()
            assert (row(sup, "a").inflight, row(sup, "a").waiting) == (1, 0)
    assert row(sup, "a").inflight == 0


async def test_outside_a_running_supervisor_it_raises_closed(recorder: Recorder) -> None:
    sup = Supervisor(shutdown=recorder)
    worker = Worker(sup, "a")
    worker.release.set()
    with pytest.raises(SupervisorClosedError):  # not started yet
        await anyio.to_thread.run_sync(worker)
    async with sup:
        sup.register("a", "model-a")
    with pytest.raises(SupervisorClosedError):  # closed
        await anyio.to_thread.run_sync(worker)
