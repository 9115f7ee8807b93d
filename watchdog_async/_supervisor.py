"""The Supervisor: lifecycle, public methods, the busy-event consumer and the deadline loop.

This is the imperative shell. Rules live in :mod:`._policy` and state in :mod:`._registry`;
here is what waits, spawns, cancels and talks to the outside (callbacks, probes, processes).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from loguru import logger

from . import _policy as policy
from ._errors import (
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    DuplicateBackendError,
    SupervisorClosedError,
    UnknownBackendError,
    WatchdogError,
)
from ._events import BackendStatus, EventStream, Eviction, EvictionReason
from ._memory import DeviceMemory, MemoryProbe, MemoryReading, check_reading, default_probe
from ._registry import INHERIT, Backend, Call, CallState, Record, Registry
from ._settings import Settings, check_count, parse_duration, required_duration
from ._stopping import ProcessRef, stop_backend, stop_tree, tree_pids

__all__ = ("BusyHandle", "Supervisor")

Shutdown = Callable[[Backend], Awaitable[None]]
Start = Callable[[str], Awaitable[tuple[str, Any] | str]]

_NEW, _QUEUED, _ENDED_QUEUED, _EXIT_QUEUED = (
    CallState.NEW,
    CallState.QUEUED,
    CallState.ENDED_QUEUED,
    CallState.EXIT_QUEUED,
)
_COALESCE = 0.001  # seconds the consumer lets busy messages gather before applying them


# asyncio.Queue's internals the lean put_nowait relies on (CPython 3.8 to 3.13); without them
# the standard put_nowait is used, which only costs time.
_LEAN_QUEUE = hasattr(asyncio.Queue, "_wakeup_next") and "_getters" in vars(asyncio.Queue())


class _BusyQueue(asyncio.Queue["BusyHandle"]):
    """The busy-message queue: an unbounded ``asyncio.Queue`` (the consumer awaits ``get()``)
    whose ``put_nowait`` skips what busy() never uses (the size check and ``join()``'s
    ``unfinished_tasks``/``_finished`` bookkeeping), and whose deque the drain pops directly
    (``_init`` is asyncio.Queue's hook for subclasses, as in PriorityQueue and LifoQueue)."""

    items: deque[BusyHandle]

    def _init(self, maxsize: int) -> None:
        self._queue = self.items = deque()

    if _LEAN_QUEUE:

        def put_nowait(self, item: BusyHandle) -> None:
            self.items.append(item)
            if self._getters:  # type: ignore[attr-defined]  # the consumer is parked in get()
                self._wakeup_next(self._getters)  # type: ignore[attr-defined]


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class BusyHandle(Call):
    """One call inside ``busy()``: the async context manager and the handle it yields.

    It is also the queue message: entering puts it on the queue once; leaving puts it again
    only if the consumer has already applied the mark (otherwise one message carries both).
    """

    __slots__ = ("_address", "_sup", "_wait_timeout", "limiter", "stopped", "task")
    _wait_timeout: float  # set only when busy() was given one

    def __init__(self, sup: Supervisor, address: str) -> None:
        self._sup = sup
        self._address = address
        self.stopped: EvictionReason | None = None  # set when the supervisor stopped the backend
        self.limiter: _Limiter | None = None
        self.state = _NEW

    @property
    def address(self) -> str:
        return self._address

    def progress(self) -> None:
        """Report progress: the backend's busy timer starts again from now."""
        record = self.record
        now = self._sup._clock()
        if now > record.last_progress:
            record.last_progress = now

    def _enter(self, record: Record, task: asyncio.Task[Any] | None) -> None:
        """Mark this call in flight (synchronous: nothing can see the backend idle between a
        check and this mark)."""
        sup = self._sup
        self.record = record
        self.entered_at = sup._clock()
        self.state = _QUEUED
        self.task = task
        sup._put(self)

    def _leave(self) -> None:
        """Record the exit: one message for both if the mark is still queued."""
        sup = self._sup
        self.exited_at = sup._clock()
        if self.state is _QUEUED:
            self.state = _ENDED_QUEUED
        else:
            self.state = _EXIT_QUEUED
            sup._put(self)
        limiter = self.limiter
        if limiter is not None:
            self.limiter = None
            limiter.release()

    # __aenter__ and __aexit__ inline _enter and _leave: they are the hot path.
    async def __aenter__(self) -> Self:
        if self.state is not _NEW:
            raise RuntimeError("a busy() handle is entered once: call sup.busy() for each call")
        sup = self._sup
        # _records is emptied when the supervisor closes: one lookup checks both
        record = sup._records.get(self._address)
        if record is None or record.stopping is not None:
            raise sup._refusal(self._address, record)
        limiter = record.limiter
        if limiter is not None:
            if not limiter.try_admit():  # a free slot and nobody waiting: no await
                await limiter.wait_for_slot(self, getattr(self, "_wait_timeout", None))
                # handed the slot, but the backend may have been chosen for eviction (or the
                # supervisor closed) before this task ran: do not enter it then
                if record.stopping is not None or sup._state is not _State.RUNNING:
                    limiter.release()
                    raise sup._refusal(self._address, record)
                if record.limiter is not limiter:
                    # the limit was removed (and maybe set again) while this caller waited:
                    # admitted, it counts against the current limiter like a call in flight
                    limiter.release()
                    limiter = record.limiter
                    if limiter is not None:
                        limiter.admitted += 1
            self.limiter = limiter
        self.record = record
        self.entered_at = sup._clock()
        self.state = _QUEUED
        self.task = sup._current_task()
        sup._put(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        sup = self._sup
        self.exited_at = sup._clock()
        if self.state is _QUEUED:
            self.state = _ENDED_QUEUED
        else:
            self.state = _EXIT_QUEUED
            sup._put(self)
        if self.limiter is not None:
            limiter, self.limiter = self.limiter, None
            limiter.release()
        if self.stopped is not None:
            self._raise_stopped(exc)
        return False

    def _raise_stopped(self, exc: BaseException | None) -> None:
        """The supervisor stopped the backend under this call (and cancelled the task): turn
        that cancellation into BackendStoppedError. Someone else's cancellation still wins."""
        reason = self.stopped
        assert reason is not None
        task = self.task
        if task is not None:
            self.task = None
            if task.uncancel() > 0 and isinstance(exc, asyncio.CancelledError):
                return  # also cancelled from outside: let that cancellation go on
        elif isinstance(exc, asyncio.CancelledError):
            return  # not cancelled by us (see _fail_calls): that cancellation goes on
        if exc is None or isinstance(exc, asyncio.CancelledError):
            raise BackendStoppedError(self._address, reason) from None
        # the caller's own error passes through unchanged

    def __repr__(self) -> str:
        return f"<BusyHandle {self._address!r} {self.state.name}>"


class _Limiter:
    """Admission for one backend: at most ``limit`` calls in flight; the rest wait in FIFO
    order (no barging) up to ``max_waiting``."""

    __slots__ = ("address", "admitted", "limit", "waiters")

    def __init__(self, address: str, limit: int) -> None:
        self.address = address
        self.limit = limit
        self.admitted = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_admit(self) -> bool:
        if self.admitted < self.limit and not self.waiters:
            self.admitted += 1
            return True
        return False

    async def wait_for_slot(self, handle: BusyHandle, wait_timeout: float | None) -> None:
        """Queue behind the other waiters (``try_admit`` said no) until a slot is handed over."""
        sup = handle._sup
        if len(self.waiters) >= sup._settings.max_waiting:
            raise BackendBusyError(self.address, f"{len(self.waiters)} callers already waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            with anyio.move_on_after(math.inf if wait_timeout is None else wait_timeout):
                await waiter
                return
            raise BackendBusyError(self.address, f"no free slot within {wait_timeout} s")
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # admitted as we gave up: pass the slot on
            else:
                waiter.cancel()
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.admitted -= 1
        self._admit()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._admit()

    def _admit(self) -> None:
        """Hand free slots to the first waiters (none while over a lowered limit)."""
        while self.admitted < self.limit and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.admitted += 1

    def fail_waiters(self, error: Callable[[], BaseException]) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())


class _Stop:
    """One stop of one backend; every eviction that picks the backend meanwhile shares it."""

    __slots__ = ("done", "reason", "record", "result")

    def __init__(self, record: Record, reason: EvictionReason) -> None:
        self.record = record
        self.reason = reason
        self.done = anyio.Event()
        self.result: Eviction | None = None

    async def wait(self) -> Eviction:
        await self.done.wait()
        assert self.result is not None
        return self.result


class _SharedRead:
    """One memory reading in progress, awaited by every caller that asked meanwhile."""

    __slots__ = ("done", "reading")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reading: MemoryReading | None = None


class _Load:
    """One load of one model in progress (singleflight): every acquire() waits on it."""

    __slots__ = ("done", "error", "record", "traceback", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.record: Record | None = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None  # the start's own, for every waiter
        self.waiters: dict[asyncio.Task[Any], BusyHandle | None] = {}


class _Acquire:
    """``async with sup.acquire(model, start) as backend``."""

    __slots__ = ("_handle", "_memory", "_model", "_start", "_sup")

    def __init__(self, sup: Supervisor, model: str, start: Start, memory: int | None) -> None:
        self._sup, self._model, self._start, self._memory = sup, model, start, memory
        self._handle: BusyHandle | None = None

    async def __aenter__(self) -> Backend:
        if self._handle is not None:
            raise RuntimeError("this acquire() is already entered: call sup.acquire() again")
        self._handle = await self._sup._acquire_handle(self._model, self._start, self._memory)
        return self._handle.record.public

    def progress(self) -> None:
        """Report progress on the acquired backend (as :meth:`BusyHandle.progress`): a stream
        that calls this per chunk is not taken for hung by ``busy_timeout``."""
        if self._handle is None:
            raise RuntimeError("progress() is for use inside `async with sup.acquire(...)`")
        self._handle.progress()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        handle, self._handle = self._handle, None
        assert handle is not None
        return await handle.__aexit__(exc_type, exc, tb)


class Supervisor:
    """Supervises model-serving backends: see README and DESIGN.md.

    Use it as ``async with Supervisor(...) as sup:``, or start it in your own task group with
    ``await tg.start(sup.run)``. A supervisor runs once; after it closes every call raises
    :class:`SupervisorClosedError`.
    """

    def __init__(
        self,
        *,
        shutdown: Shutdown | None = None,
        memory_probe: MemoryProbe | None = None,
        clock: Callable[[], float] | None = None,
        settings: Settings | None = None,
        **values: Any,
    ) -> None:
        if settings is None:
            settings = Settings().replace(**values)
        elif values:
            Settings().replace(**values)  # names an unknown setting first
            raise ConfigError("pass either settings= or individual settings, not both")
        elif not isinstance(settings, Settings):
            raise ConfigError(f"settings must be a Settings, got {settings!r}")
        self._settings = settings
        if shutdown is not None and not callable(shutdown):
            raise ConfigError(f"shutdown must be an async callable, got {shutdown!r}")
        if clock is not None and not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        if memory_probe is not None and not callable(getattr(memory_probe, "read", None)):
            raise ConfigError(f"memory_probe must have a read() method, got {memory_probe!r}")
        self._shutdown = shutdown
        self._probe = memory_probe
        self._owns_probe = False  # chosen by default_probe(): closed when the supervisor closes
        self._given_clock = clock
        self._clock: Callable[[], float] = clock or _not_running_clock
        self._state = _State.CREATED
        self._registry = Registry()
        self._queue = _BusyQueue()
        self._put = self._queue.put_nowait
        self._held: BusyHandle | None = None  # taken off the queue by the consumer, not applied
        self._records: dict[str, Record] = self._registry.records  # the hot path's lookup
        self._current_task: Callable[[], asyncio.Task[Any] | None] = asyncio.current_task
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._outer_tg: anyio.abc.TaskGroup | None = None
        self._stop_requested: anyio.Event | None = None
        self._wake: anyio.Event | None = None
        self._planned_wake = math.inf
        self._periodic_wake: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._subscribers: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._loading: dict[str, _Load] = {}
        self._reserved = 0  # loads that made room and are not registered yet
        self._stops: set[_Stop] = set()
        self._watched: set[Record] = set()  # records with a process: checked for exits
        self._probe_running = False
        self._read_in_flight: _SharedRead | None = None
        self._memory_lock: anyio.Lock | None = None
        self._faults: dict[str, int] = {}
        self._last_reading: MemoryReading | None = None

    @classmethod
    def from_env(
        cls,
        prefix: str = "WATCHDOG_",
        *,
        environ: Mapping[str, str] | None = None,
        shutdown: Shutdown | None = None,
        memory_probe: MemoryProbe | None = None,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> Self:
        """A supervisor whose settings come from ``PREFIX*`` environment variables (or
        ``environ``); keyword settings override them."""
        settings = Settings.from_env(prefix, environ=environ, **overrides)
        return cls(shutdown=shutdown, memory_probe=memory_probe, clock=clock, settings=settings)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not _State.CREATED:
            raise SupervisorClosedError("a Supervisor runs once; create a new one")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.run)
        except BaseException as exc:
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._outer_tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._outer_tg is not None and self._stop_requested is not None
        self._stop_requested.set()
        return await self._outer_tg.__aexit__(exc_type, exc, tb)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled (or until ``async with`` ends); then close."""
        if self._state is not _State.CREATED:
            raise SupervisorClosedError("a Supervisor runs once; create a new one")
        self._loop = loop = asyncio.get_running_loop()
        self._clock = self._given_clock or _loop_clock(loop)
        self._current_task = _task_getter(loop)
        listen = getattr(self._given_clock, "add_listener", None)
        if callable(listen):
            listen(self._wake_deadline_loop)  # a hand-driven clock wakes us when it moves
        self._stop_requested = anyio.Event()
        self._memory_lock = anyio.Lock()
        self._state = _State.RUNNING
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._consume)
                tg.start_soon(self._deadline_loop)
                tg.start_soon(self._periodic_loop)
                task_status.started()
                try:
                    await self._stop_requested.wait()
                finally:
                    with anyio.CancelScope(shield=True) as scope:
                        scope.deadline = anyio.current_time() + self._close_bound()
                        await self._close()
                    tg.cancel_scope.cancel()
        finally:
            self._state = _State.CLOSED
            for buffer in list(self._subscribers):
                buffer.close()

    def _close_bound(self) -> float:
        s = self._settings
        return s.stop_timeout * 3 + 5.0

    async def _close(self) -> None:
        self._state = _State.CLOSING
        self._records = {}  # busy() refuses new calls from now on
        self._drain()
        self._notify_changed()  # make_room/evict waiters: SupervisorClosedError now
        for record in self._registry:
            if record.limiter is not None:
                record.limiter.fail_waiters(
                    lambda r=record: BackendStoppedError(r.address, EvictionReason.CLOSING)
                )
        if self._settings.stop_on_exit:
            stops = [self._begin_stop(r, EvictionReason.CLOSING) for r in list(self._registry)]
            for stop in stops:
                await stop.wait()
        for stop in list(self._stops):
            await stop.wait()
        close_probe = getattr(self._probe, "close", None) if self._owns_probe else None
        if callable(close_probe):  # the probe we chose ourselves (NVML is shut down once)
            try:
                # abandoned at the bound: a wedged driver (a read may be hung already) must
                # not keep the application from leaving
                await anyio.to_thread.run_sync(close_probe, abandon_on_cancel=True)
            except Exception as exc:
                self._fault("memory probe", exc)

    def _refusal(self, address: str, record: Record | None) -> WatchdogError:
        """Why ``busy()`` refuses a call at once."""
        if self._state is not _State.RUNNING:
            return self._closed_error()
        if record is None:
            if not isinstance(address, str) or not address:
                return ConfigError(f"address must be a non-empty string, got {address!r}")
            return UnknownBackendError(address)
        assert record.stopping is not None
        return BackendStoppedError(address, record.stopping)

    def _closed_error(self) -> SupervisorClosedError:
        if self._state is _State.CREATED:
            return SupervisorClosedError("the supervisor is not running yet (use async with)")
        return SupervisorClosedError("the supervisor is closed")

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            raise self._closed_error()

    # -- settings ---------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, **changes: Any) -> Settings:
        """Change settings live; validated as a whole (nothing changes on error); no tracked
        state is lost. Returns the new settings."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            raise self._closed_error()
        old, new = self._settings, self._settings.replace(**changes)
        self._settings = new
        if self._state is not _State.RUNNING:
            return new
        self._drain()
        if (old.busy_timeout, old.idle_timeout) != (new.busy_timeout, new.idle_timeout):
            policy.reschedule_all(self._registry, new)
        if old.max_concurrency != new.max_concurrency:
            for record in self._registry:
                self._set_limiter(record)
        self._wake_deadline_loop()
        if self._periodic_wake is not None:
            self._periodic_wake.set()
        return new

    def _set_limiter(self, record: Record) -> None:
        limit = policy.max_concurrency(record, self._settings)
        if limit is None:
            if record.limiter is not None:
                record.limiter.set_limit(1 << 62)  # let every waiter in; no more admission
                record.limiter = None
        elif record.limiter is None:
            limiter = record.limiter = _Limiter(record.address, limit)
            for call in record.calls:  # calls already in flight count against the new limit
                assert isinstance(call, BusyHandle)
                call.limiter = limiter
                limiter.admitted += 1
        else:
            record.limiter.set_limit(limit)

    # -- backends ---------------------------------------------------------------------------

    def register(
        self,
        address: str,
        model: str,
        *,
        process: object = None,
        pinned: bool = False,
        idle_timeout: float | str | object | None = INHERIT,
        size: int | None = None,
        max_concurrency: int | object | None = INHERIT,
    ) -> Backend:
        """Track a backend. ``process`` (pid, psutil/asyncio/anyio process or Popen) is what
        gets signalled when it must be stopped; its create time is recorded now."""
        self._check_running()
        if not isinstance(address, str) or not address:
            raise ConfigError(f"address must be a non-empty string, got {address!r}")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string, got {model!r}")
        if not isinstance(pinned, bool):
            raise ConfigError(f"pinned must be a bool, got {pinned!r}")
        if idle_timeout is not INHERIT:
            idle_timeout = parse_duration(idle_timeout, name="idle_timeout", optional=True)
        for name, value in (("size", size), ("max_concurrency", max_concurrency)):
            if isinstance(value, str):  # strings are for the environment, not for register()
                raise ConfigError(f"{name} must be a whole number or None, got {value!r}")
        size = check_count(size, "size", optional=True)
        if max_concurrency is not INHERIT:
            max_concurrency = check_count(
                max_concurrency, "max_concurrency", optional=True, minimum=1
            )
        if address in self._registry.records:
            raise DuplicateBackendError(address)
        ref = None if process is None else ProcessRef.resolve(process)
        record = Record(
            address=address,
            model=model,
            now=self._clock(),
            process=ref,
            pinned=pinned,
            idle_timeout=idle_timeout,
            size=size,
            max_concurrency=max_concurrency,
        )
        self._registry.add(record)
        if ref is not None:
            self._watched.add(record)
        self._set_limiter(record)
        policy.schedule(self._registry, record, self._settings)
        self._wake_if_earlier()
        self._notify_changed()  # one more idle backend: evictable for a waiting make_room
        logger.debug("registered {} ({}) pid={}", address, model, record.public.pid)
        return record.public

    def forget(self, address: str) -> Backend:
        """Stop tracking a backend without stopping it. Calls in flight go on untracked."""
        self._check_running()
        self._drain()
        record = self._registry.get(address)
        self._untrack(record)
        if record.limiter is not None:
            record.limiter.set_limit(1 << 62)
        self._notify_changed()
        return record.public

    def busy(self, address: str, *, wait_timeout: float | str | None = None) -> BusyHandle:
        """``async with sup.busy(address) as call:`` around every call to the backend.
        ``wait_timeout`` bounds the wait for a free slot where ``max_concurrency`` applies."""
        handle = BusyHandle(self, address)
        if wait_timeout is not None:  # set only when given: the common path stores less
            handle._wait_timeout = required_duration(wait_timeout, "wait_timeout")
        return handle

    @contextmanager
    def busy_sync(self, address: str) -> Iterator[BusyHandle]:
        """``busy()`` for code running in a worker thread (e.g. under ``anyio.to_thread``).
        A forced stop cannot interrupt a thread: the call raises BackendStoppedError when it
        leaves."""
        loop = self._loop
        if loop is None:
            raise self._closed_error()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # no loop running in this thread: a worker thread
            on_loop = False
        if on_loop:
            raise RuntimeError("busy_sync() is for worker threads; use busy() on the loop")
        handle = BusyHandle(self, address)

        async def enter() -> None:
            await handle.__aenter__()
            handle.task = None  # the thread, not this helper task, makes the call

        asyncio.run_coroutine_threadsafe(enter(), loop).result()
        try:
            yield handle
        except BaseException:
            loop.call_soon_threadsafe(handle._leave)
            raise  # the caller's own error passes through, as with busy()
        loop.call_soon_threadsafe(handle._leave)
        if handle.stopped is not None:
            raise BackendStoppedError(address, handle.stopped)

    def touch(self, address: str) -> None:
        """Count a use for LRU order without a call."""
        self._check_running()
        self._drain()
        self._registry.touch(self._registry.get(address), self._clock())

    @property
    def loaded_count(self) -> int:
        self._drain()
        return len(self._registry)

    def snapshot(self) -> list[BackendStatus]:
        """Every tracked backend, least recently used first."""
        if self._state is _State.CREATED:
            return []
        self._drain()
        now = self._clock()
        return [
            BackendStatus(
                address=r.address,
                model=r.model,
                pid=r.public.pid,
                inflight=len(r.calls),
                waiting=0 if r.limiter is None else len(r.limiter.waiters),
                busy_for=now - r.last_progress if r.calls else None,
                idle_for=None if r.calls else now - r.idle_since,
                last_used=r.last_used,
                pinned=r.pinned,
                stopping=r.stopping is not None,
            )
            for r in self._registry
        ]

    def events(self, *, buffer: int = 1000) -> EventStream:
        """``async for eviction in sup.events():`` every eviction from now on. A subscriber
        that falls more than ``buffer`` records behind loses the oldest (counted in
        ``.dropped``); iteration ends when the supervisor closes."""
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ConfigError(f"buffer must be a whole number >= 1, got {buffer!r}")
        if self._state in (_State.CLOSING, _State.CLOSED):
            raise self._closed_error()
        subscription = EventStream(buffer)
        self._subscribers.add(subscription)
        return subscription

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the supervisor runs on (None before it starts)."""
        return self._loop

    @property
    def memory_reading(self) -> MemoryReading | None:
        """The last valid memory reading the reclaimer took (None before the first)."""
        return self._last_reading

    @property
    def faults(self) -> dict[str, int]:
        """How many times each kind of failure (probe, callback, signal...) has happened."""
        return dict(self._faults)

    # -- queue ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        get = self._queue.get
        while True:
            self._held = await get()  # still "queued": every drain applies it first
            # Let messages gather for a moment: a call that enters and ends within it travels
            # as one message instead of two, and a batch costs one wake-up. Decisions never
            # wait for this (they apply the queue first); deadlines are computed from the
            # readings the messages carry; callers waiting for an idle backend skip it.
            if self._changed is None:
                await anyio.sleep(_COALESCE)
            self._drain()

    def _drain(self) -> None:
        """Apply every queued message now (the one the consumer holds first), so a call that
        entered busy() is always seen in flight. Synchronous: nothing is put on the queue
        meanwhile."""
        items = self._queue.items
        first = self._held
        if first is not None:
            self._held = None
        elif not items:
            return
        else:
            first = items.popleft()
        get, apply, schedule = items.popleft, self._registry.apply, policy.schedule
        registry, settings = self._registry, self._settings
        went_idle = pushed = False
        call = first
        while True:
            if apply(call):  # between busy and idle: schedule its deadline
                record = call.record
                if not record.calls:
                    went_idle = True
                if record.registered and schedule(registry, record, settings):
                    pushed = True
            if not items:
                break
            call = get()
        if pushed:
            self._wake_if_earlier()
        if went_idle and self._changed is not None:
            self._notify_changed()

    def _notify_changed(self) -> None:
        changed = self._changed
        if changed is not None:  # someone waits: wake them (nothing to do otherwise)
            self._changed = None
            changed.set()

    async def _wait_changed(self, deadline: float, since: anyio.Event | None = None) -> bool:
        """Wait for a backend to go idle, be removed or finish stopping; False at deadline.
        ``since``: the change event taken before the state was looked at; a change that came
        after it (the event is then set) ends the wait at once, so no wake-up is lost."""
        if since is not None:
            changed = since
        else:
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await changed.wait()
            return True
        return False

    # -- deadline loop ----------------------------------------------------------------------

    def _wake_deadline_loop(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _wake_if_earlier(self) -> None:
        deadline = policy.next_deadline(self._registry)
        if deadline is not None and deadline < self._planned_wake:
            self._wake_deadline_loop()

    async def _deadline_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            self._drain()
            for record, reason in policy.due(self._registry, self._clock(), self._settings):
                self._begin_stop(record, reason)
            deadline = policy.next_deadline(self._registry)
            self._planned_wake = math.inf if deadline is None else deadline
            delay = math.inf if deadline is None else max(0.0, deadline - self._clock())
            with anyio.move_on_after(delay):
                await self._wake.wait()

    async def _periodic_loop(self) -> None:
        last = anyio.current_time()
        while True:
            self._periodic_wake = anyio.Event()
            # counted from the last check, not from the last wake-up: configure() wakes us to
            # read a new check_interval, and frequent changes must not postpone every check
            delay = last + self._settings.check_interval - anyio.current_time()
            with anyio.move_on_after(max(0.0, delay)):
                await self._periodic_wake.wait()
                continue  # settings changed: the interval may be shorter now
            try:
                await self._detect_exits()
                if self._settings.memory_threshold is not None:
                    await self._memory_pass()
            except Exception as exc:  # never let a check stop the supervisor
                self._fault("periodic check", exc)
            last = anyio.current_time()

    # -- stopping ---------------------------------------------------------------------------

    def _begin_stop(self, record: Record, reason: EvictionReason) -> _Stop:
        """Mark ``record`` stopping (no new calls from now) and start stopping it, or join the
        stop already running. Callers still inside busy() fail at once: only forced evictions
        get here with calls in flight (unforced ones pick idle backends, or wait)."""
        self._drain()
        stop: _Stop | None = record.stop
        if stop is None:
            record.stopping = reason
            record.attempted += 1
            if record.limiter is not None:
                record.limiter.fail_waiters(lambda: BackendStoppedError(record.address, reason))
            stop = record.stop = _Stop(record, reason)
            self._stops.add(stop)
            assert self._tg is not None
            self._tg.start_soon(self._run_stop, stop)
        if record.calls:
            self._fail_calls(record, reason)
        return stop

    def _fail_calls(self, record: Record, reason: EvictionReason) -> None:
        for call in list(record.calls):
            assert isinstance(call, BusyHandle)
            if call.stopped is None:
                call.stopped = reason
                task = call.task
                if task is not None and not task.done():
                    if task is asyncio.current_task():
                        # the caller itself asked (check() or evict() inside its own busy()):
                        # no cancellation to convert; its exit raises BackendStoppedError
                        call.task = None
                    elif task.cancelling():
                        # Already being cancelled (the caller's own timeout, a disconnect):
                        # cancelling again in the same round would fold both into one
                        # CancelledError with our message, which the caller's cancel scope
                        # would not recognise as its own. Let that cancellation win.
                        call.task = None
                    else:
                        task.cancel()

    async def _run_stop(self, stop: _Stop) -> None:
        record = stop.record
        settings = self._settings
        started = anyio.current_time()
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = started + self._close_bound()
            ok, error = await stop_backend(
                record.public,
                record.process,
                shutdown=self._shutdown,
                stop_timeout=settings.stop_timeout,
            )
        if scope.cancelled_caught:
            ok, error = False, TimeoutError("stopping took longer than its bound")
        if error is not None:
            self._fault("stop", error)
        eviction = Eviction(
            address=record.address,
            model=record.model,
            reason=stop.reason,
            ok=ok,
            error=error,
            duration=anyio.current_time() - started,
        )
        record.stop = None
        record.claimed = False
        if ok:
            record.evicted = eviction
            self._untrack(record)
        else:  # still tracked and counted; idle from now so a retry is not immediate
            policy.stop_failed(record, self._clock())
            policy.schedule(self._registry, record, self._settings)
            self._wake_if_earlier()
        stop.result = eviction
        self._stops.discard(stop)
        self._publish(eviction)
        stop.done.set()
        self._notify_changed()

    def _publish(self, eviction: Eviction) -> None:
        if eviction.ok:
            logger.info(
                "evicted {} ({}): reason={} in {:.3f}s",
                eviction.address,
                eviction.model,
                eviction.reason.value,
                eviction.duration,
            )
        else:
            logger.warning(
                "could not stop {} ({}): reason={} error={!r}",
                eviction.address,
                eviction.model,
                eviction.reason.value,
                eviction.error,
            )
        for buffer in list(self._subscribers):
            buffer.push(eviction)

    def _fault(self, kind: str, exc: BaseException) -> None:
        """Log a failure once per kind (then at debug level) and count it."""
        key = f"{kind}: {type(exc).__name__}"
        count = self._faults.get(key, 0)
        self._faults[key] = count + 1
        if count == 0:
            logger.opt(exception=exc).warning("{} failed: {!r}", kind, exc)
        else:
            logger.debug("{} failed again: {!r}", kind, exc)

    def _untrack(self, record: Record) -> None:
        self._registry.remove(record)
        self._watched.discard(record)

    async def _detect_exits(self) -> None:
        watched = [
            (r, r.process) for r in self._watched if r.stopping is None and r.process is not None
        ]
        if not watched:
            return
        dead = await anyio.to_thread.run_sync(
            lambda: [r for r, ref in watched if not ref.is_alive()]
        )
        for record in dead:
            if record.registered and record.stopping is None:
                self._untrack_exited(record)

    def _untrack_exited(self, record: Record) -> None:
        self._drain()
        self._fail_calls(record, EvictionReason.EXITED)
        if record.limiter is not None:
            record.limiter.fail_waiters(
                lambda: BackendStoppedError(record.address, EvictionReason.EXITED)
            )
        self._untrack(record)
        record.evicted = Eviction(record.address, record.model, EvictionReason.EXITED, ok=True)
        self._publish(record.evicted)
        self._notify_changed()

    # -- eviction entry points ----------------------------------------------------------------

    async def evict(self, address: str, *, force: bool = False) -> Eviction:
        """Stop one backend now. Unforced: it takes no new calls and its calls in flight get
        ``eviction_timeout`` to end, else CapacityError (and it stays). Forced: its callers
        get BackendStoppedError at once."""
        self._check_running()
        if not isinstance(force, bool):
            raise ConfigError(f"force must be a bool, got {force!r}")
        self._drain()
        record = self._registry.get(address)
        if record.stop is None and record.calls and not force:
            deadline = anyio.current_time() + self._settings.eviction_timeout
            record.stopping = EvictionReason.MANUAL  # draining: no new calls
            record.draining += 1
            if record.limiter is not None:  # nor waiting ones
                record.limiter.fail_waiters(
                    lambda: BackendStoppedError(address, EvictionReason.MANUAL)
                )
            try:
                while record.calls and record.stop is None and record.registered:
                    changed = await self._wait_changed(deadline)
                    self._check_running()
                    if not changed:
                        raise CapacityError(
                            f"{address!r} still had {len(record.calls)} call(s) in flight after "
                            f"{self._settings.eviction_timeout} s"
                        )
                    self._drain()
            finally:
                record.draining -= 1
                if record.stop is None and record.registered and not record.draining:
                    record.stopping = None  # gave up (or cancelled): it takes calls again
                    policy.schedule(self._registry, record, self._settings)
                    self._wake_if_earlier()
                    self._notify_changed()
            if not record.registered:  # stopped (or forgotten) by someone else meanwhile
                evicted: Eviction | None = record.evicted
                if evicted is not None:
                    return evicted
                raise UnknownBackendError(address)
        return await self._begin_stop(record, EvictionReason.MANUAL).wait()

    async def check(self) -> list[Eviction]:
        """Run the busy, idle and memory checks once, now; return what they evicted."""
        self._check_running()
        self._drain()
        due = policy.due(self._registry, self._clock(), self._settings)
        stops = [self._begin_stop(record, reason) for record, reason in due]
        evictions = [await stop.wait() for stop in stops]
        await self._detect_exits()
        if self._settings.memory_threshold is not None:
            evictions += await self._memory_pass()
        return evictions

    async def make_room(
        self,
        *,
        pending: int = 0,
        memory: int | None = None,
        timeout: float | str | None = None,
        force: bool | None = None,
    ) -> list[Eviction]:
        """Evict until one more backend fits: ``loaded + pending + 1 <= max_loaded`` and, with
        ``memory=BYTES``, some device can take BYTES and stay at or under the threshold."""
        self._check_running()
        if isinstance(pending, bool) or not isinstance(pending, int) or pending < 0:
            raise ConfigError(f"pending must be a whole number >= 0, got {pending!r}")
        return await self._make_room(
            pending=pending, memory=memory, timeout=timeout, force=force, reserve=False
        )

    async def _make_room(
        self,
        *,
        pending: int,
        memory: int | None,
        timeout: float | str | None,
        force: bool | None,
        reserve: bool,
    ) -> list[Eviction]:
        _check_bytes(memory)
        if force is not None and not isinstance(force, bool):
            raise ConfigError(f"force must be a bool, got {force!r}")
        wait = parse_duration(
            self._settings.eviction_timeout if timeout is None else timeout, name="timeout"
        )
        assert wait is not None
        force = self._settings.force_eviction_when_busy if force is None else force
        deadline = anyio.current_time() + wait
        tried: list[Eviction] = []
        attempted: set[Record] = set()
        while True:
            self._check_running()
            self._drain()
            if self._changed is None:  # register for changes before any await below
                self._changed = anyio.Event()
            changed = self._changed
            registry = self._registry
            need = policy.room_needed(
                len(registry), self._reserved + pending, self._settings.max_loaded
            )
            # stops already running that nobody counts on free a slot each
            unclaimed = [s.record for s in self._stops if not s.record.claimed][:need]
            victims = policy.lru_victims(
                registry, need - len(unclaimed), force=force, exclude=attempted
            )
            reason = EvictionReason.LRU
            fit_device: DeviceMemory | None = None
            if need == 0 and memory:
                missing = await self._memory_missing(memory)
                self._drain()
                if policy.room_needed(
                    len(registry), self._reserved + pending, self._settings.max_loaded
                ):
                    continue  # a load reserved or registered meanwhile: count again
                if missing:
                    reason = EvictionReason.MEMORY
                    victims, fit_device = await self._memory_fit_victims(memory, force, attempted)
                    if not victims:
                        # nothing left to evict now: wait for a stop in progress to finish
                        # or a busy backend to go idle, then look again; give up at deadline
                        if not await self._wait_changed(deadline, changed):
                            raise CapacityError(
                                f"{missing} bytes missing for a load of {memory} bytes",
                                evictions=tuple(tried),
                                missing_bytes=missing,
                            )
                        continue
                    need = len(victims)
            if need == 0:
                if reserve:
                    self._reserved += 1
                return tried
            for record in unclaimed:
                record.claimed = True
            stops = [r.stop for r in unclaimed]
            for record in victims:
                attempted.add(record)
                record.claimed = True
                stops.append(self._begin_stop(record, reason))
            if stops:
                try:
                    for stop in stops:
                        result = await stop.wait()
                        if result not in tried:
                            tried.append(result)
                except BaseException:  # cancelled: the stops go on, nobody counts on them now
                    for stop in stops:
                        if stop.result is None:
                            stop.record.claimed = False
                    raise
                if fit_device is not None:
                    await self._await_release(fit_device)
                continue
            # nothing evictable now: wait for a busy backend to go idle, or give up
            if not await self._wait_changed(deadline, changed):
                raise CapacityError(
                    f"no room for one more backend: {len(registry)} loaded, "
                    f"{self._reserved + pending} pending, max_loaded="
                    f"{self._settings.max_loaded}; the rest are busy or pinned",
                    evictions=tuple(tried),
                )

    # -- memory -----------------------------------------------------------------------------

    async def _read_memory(self) -> MemoryReading | None:
        """One reading; a read already in flight (the periodic check, check(), make_room)
        is joined, not failed: its result is everyone's."""
        shared = self._read_in_flight
        if shared is None:
            shared = self._read_in_flight = _SharedRead()
            assert self._tg is not None
            self._tg.start_soon(self._read_shared, shared)
        await shared.done.wait()
        return shared.reading

    async def _read_shared(self, shared: _SharedRead) -> None:
        try:
            shared.reading = await self._read_once()
        finally:
            self._read_in_flight = None
            shared.done.set()

    async def _read_once(self) -> MemoryReading | None:
        """One reading in a worker thread, bounded by probe_timeout; None when the probe
        fails, hangs or returns nonsense (logged once per kind)."""
        if self._probe_running:
            self._fault("memory probe", TimeoutError("previous read still running"))
            return None
        self._probe_running = True

        def read() -> object:
            try:
                if self._probe is None:
                    self._probe, self._owns_probe = default_probe(), True
                    logger.info(
                        "memory probe: {}", getattr(self._probe, "description", self._probe)
                    )
                return self._probe.read()
            finally:
                self._probe_running = False

        reading: object = None
        try:
            with anyio.move_on_after(self._settings.probe_timeout) as scope:
                reading = await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
        except Exception as exc:
            self._fault("memory probe", exc)
            return None
        if scope.cancelled_caught:
            self._fault(
                "memory probe", TimeoutError(f"no reading within {self._settings.probe_timeout} s")
            )
            return None
        problem = check_reading(reading)
        if problem is not None:
            self._fault("memory probe", ValueError(problem))
            return None
        assert isinstance(reading, MemoryReading)
        self._last_reading = reading
        return reading

    async def _held_on(self, device: DeviceMemory) -> dict[str, int]:
        """Bytes each backend holds on ``device`` (see :func:`policy.held_on`)."""
        records = [r for r in self._registry if r.stopping is None]
        trees: dict[str, tuple[int, ...]] = {}
        if device.processes is not None:
            watched = [(r.address, r.process) for r in records if r.process is not None]
            trees = await anyio.to_thread.run_sync(
                lambda: {address: tree_pids(ref) for address, ref in watched}
            )
            self._drain()  # calls that entered meanwhile count as in flight for the victims
        return policy.held_on(device, records, trees)

    async def _memory_pass(self) -> list[Eviction]:
        """For each device over the threshold, evict one backend at a time (holders first,
        then LRU), waiting for the memory to come back after each, down to the target. One
        pass at a time: a second one (check() during the periodic one) waits its turn, then
        decides on a fresh reading."""
        assert self._memory_lock is not None
        async with self._memory_lock:
            return await self._memory_pass_locked()

    async def _memory_pass_locked(self) -> list[Eviction]:
        reading = await self._read_memory()
        if reading is None:
            return []
        settings = self._settings
        threshold, target = settings.memory_threshold, settings.effective_memory_target
        assert threshold is not None and target is not None
        evictions: list[Eviction] = []
        attempted: set[Record] = set()
        for device in policy.over_threshold(reading, threshold):
            current: DeviceMemory | None = device
            if evictions:  # stops for an earlier device may have freed this one too
                fresh = await self._read_memory()
                current = None if fresh is None else _same_device(fresh, device)
            while current is not None and policy.above(current, target):
                self._drain()
                held = await self._held_on(current)
                victims = policy.memory_victims(
                    self._registry,
                    held,
                    force=settings.force_eviction_when_busy,
                    exclude=attempted,
                )
                if not victims:
                    logger.warning(
                        "memory on {} at {:.1%} (target {:.1%}): nothing evictable",
                        current.name,
                        current.used / current.total,
                        target,
                    )
                    break
                victim = victims[0]
                attempted.add(victim)
                eviction = await self._begin_stop(victim, EvictionReason.MEMORY).wait()
                evictions.append(eviction)
                if eviction.ok:
                    current = await self._await_release(current)
        return evictions

    async def _await_release(self, before: DeviceMemory) -> DeviceMemory | None:
        """Re-read (about every 250 ms, up to memory_recovery_timeout) until the device has
        given memory back; the latest reading of it (None if it cannot be read)."""
        deadline = anyio.current_time() + self._settings.memory_recovery_timeout
        latest: DeviceMemory | None = None
        while True:
            reading = await self._read_memory()
            if reading is not None:
                latest = _same_device(reading, before)
                if latest is None or policy.memory_released(before, latest):
                    return latest
            if anyio.current_time() >= deadline:
                return latest
            await anyio.sleep(0.25)

    async def _memory_missing(self, needed: int) -> int:
        reading = await self._read_memory()
        if reading is None:
            return 0  # cannot tell: do not block a load on a broken probe
        missing, _ = policy.fit_deficit(reading.devices, needed, self._settings.memory_threshold)
        return missing

    async def _memory_fit_victims(
        self, needed: int, force: bool, attempted: set[Record]
    ) -> tuple[list[Record], DeviceMemory | None]:
        """The next backend to evict so that ``needed`` bytes fit, and on which device."""
        reading = await self._read_memory()
        if reading is None:
            return [], None
        _, device = policy.fit_deficit(reading.devices, needed, self._settings.memory_threshold)
        if device is None:
            return [], None
        held = await self._held_on(device)
        victims = policy.memory_victims(self._registry, held, force=force, exclude=attempted)
        return victims[:1], device

    # -- acquire ----------------------------------------------------------------------------

    def acquire(self, model: str, start: Start, *, memory: int | None = None) -> _Acquire:
        """``async with sup.acquire(model, start) as backend:`` use a backend for ``model``,
        loading it first if none is registered. ``start(model)`` is awaited once however
        many callers ask at the same time; it returns ``(address, process)`` (process may be
        None) and the backend is registered and marked busy for every waiting caller before
        any eviction can see it idle."""
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string, got {model!r}")
        if not callable(start):
            raise ConfigError(f"start must be an async callable, got {start!r}")
        _check_bytes(memory)
        return _Acquire(self, model, start, memory)

    async def _acquire_handle(self, model: str, start: Start, memory: int | None) -> BusyHandle:
        while True:
            self._check_running()
            self._drain()
            record = self._registry.find_model(model)
            if record is not None:
                handle = BusyHandle(self, record.address)
                try:
                    await handle.__aenter__()
                except (BackendStoppedError, UnknownBackendError):
                    continue  # chosen for eviction meanwhile: load again
                return handle
            load = self._loading.get(model)
            if load is None:
                load = self._loading[model] = _Load()
                assert self._tg is not None
                self._tg.start_soon(self._load, model, start, memory, load)
            task = asyncio.current_task()
            assert task is not None
            load.waiters[task] = None
            try:
                await load.done.wait()
            except BaseException as exc:
                admitted = load.waiters.pop(task, None)
                if admitted is not None:
                    admitted._leave()
                    if admitted.stopped is not None:  # failed by a forced stop: say so
                        admitted._raise_stopped(exc)
                raise
            admitted = load.waiters.pop(task, None)
            if load.error is not None:
                raise load.error.with_traceback(load.traceback)
            if admitted is not None:
                return admitted
            # not admitted at once (concurrency limit) or gone already: go round again

    async def _load(self, model: str, start: Start, memory: int | None, load: _Load) -> None:
        record: Record | None = None
        try:
            await self._make_room(pending=0, memory=memory, timeout=None, force=None, reserve=True)
            try:
                with anyio.fail_after(
                    math.inf
                    if self._settings.start_timeout is None
                    else self._settings.start_timeout
                ):
                    started = await start(model)
                address, process = _unpack_started(started)
                try:
                    self.register(address, model, process=process)
                except BaseException:
                    await self._discard_started(process)
                    raise
                record = self._registry.get(address)
            finally:
                self._reserved -= 1
                self._notify_changed()  # a slot given back, or a backend that may be idle
        except Exception as exc:
            load.error, load.traceback = exc, exc.__traceback__
            logger.warning("starting {} failed: {!r}", model, exc)
        finally:
            if self._loading.get(model) is load:
                del self._loading[model]
            if record is not None:
                # mark every waiting caller busy before anyone can see the backend idle
                for task in list(load.waiters):
                    handle = BusyHandle(self, record.address)
                    limiter = record.limiter
                    if limiter is None or limiter.try_admit():
                        handle.limiter = limiter
                        handle._enter(record, task)
                        load.waiters[task] = handle
            load.done.set()

    async def _discard_started(self, process: object) -> None:
        """A started backend that could not be registered must not be left running."""
        if process is None:
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self._close_bound()
            try:
                await stop_tree(ProcessRef.resolve(process), timeout=self._settings.stop_timeout)
            except Exception as exc:
                self._fault("stop", exc)


def _same_device(reading: MemoryReading, device: DeviceMemory) -> DeviceMemory | None:
    """``device`` as ``reading`` sees it (same kind and index), if it is there."""
    key = (device.kind, device.index)
    return next((d for d in reading.devices if (d.kind, d.index) == key), None)


def _check_bytes(memory: object) -> None:
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, int) or memory < 0
    ):
        raise ConfigError(f"memory must be a number of bytes >= 0, got {memory!r}")


def _unpack_started(started: object) -> tuple[str, object]:
    if isinstance(started, str):
        return started, None
    if isinstance(started, tuple) and len(started) == 2 and isinstance(started[0], str):
        return started[0], started[1]
    raise ConfigError(f"start() must return (address, process) or an address, got {started!r}")


def _loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The loop's clock; ``time.monotonic`` itself where the loop's is just that (cheaper on
    the hot path). A virtual-time loop (looptime) keeps its own."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def _task_getter(loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.Task[Any] | None]:
    """``asyncio.current_task`` without its Python-level wrapper on 3.11 (C from 3.12)."""
    if sys.version_info >= (3, 12):
        return asyncio.current_task
    return functools.partial(asyncio.tasks._current_tasks.get, loop)  # type: ignore[attr-defined]


def _not_running_clock() -> float:
    raise SupervisorClosedError("the supervisor is not running yet (use async with)")
