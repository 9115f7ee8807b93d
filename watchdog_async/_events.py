"""Public records (Eviction, EvictionReason, BackendStatus) and the event stream's buffer."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

import anyio


class EvictionReason(enum.StrEnum):
    """Why a backend was stopped or untracked."""

    BUSY_TIMEOUT = "busy_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    LRU = "lru"
    MEMORY = "memory"
    MANUAL = "manual"
    EXITED = "exited"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class Eviction:
    """The outcome of one eviction.

    ``ok`` is true when the backend is confirmed stopped: its whole process tree is gone, or,
    with no process known, the shutdown callback returned without error. ``error`` holds the
    first failure met on the way (a callback's exception, a timeout, a signal refused), even
    when ``ok`` is true.
    """

    address: str
    model: str
    reason: EvictionReason
    ok: bool
    error: BaseException | None = None
    duration: float = 0.0  # seconds spent stopping


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One row of :meth:`Supervisor.snapshot`."""

    address: str
    model: str
    pid: int | None
    inflight: int
    waiting: int
    busy_for: float | None  # seconds since the last progress, while busy
    idle_for: float | None  # seconds since the last call ended (or registration), while idle
    last_used: float  # clock reading of the last use
    pinned: bool
    stopping: bool


class EventStream:
    """One subscriber's view of the evictions, from subscription on (``sup.events()``).

    Its buffer is bounded: a subscriber that never reads costs at most ``maxlen`` records; the
    oldest are dropped and counted in ``dropped``. Iteration ends when the supervisor closes
    or the subscriber calls :meth:`aclose`.
    """

    __slots__ = ("__weakref__", "_closed", "_items", "_ready", "dropped")

    def __init__(self, maxlen: int) -> None:
        self._items: deque[Eviction] = deque(maxlen=maxlen)
        self._ready: anyio.Event | None = None  # what readers wait on; shared by all of them
        self._closed = False
        self.dropped = 0

    def push(self, eviction: Eviction) -> None:
        if self._closed:
            return
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(eviction)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:  # wakes every reader waiting, not only the latest one
            ready.set()

    async def aclose(self) -> None:
        """Stop receiving; what is buffered is still delivered."""
        self.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Eviction:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            ready = self._ready
            if ready is None:
                ready = self._ready = anyio.Event()
            await ready.wait()
        return self._items.popleft()
