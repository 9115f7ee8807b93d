"""Backend records, in-flight counts, LRU order and deadline heaps: pure state, no I/O, no await.

Everything here is synchronous and takes ``now`` (or a message's own clock reading) as a number,
so tests can drive it with plain data. The supervisor applies queued busy messages here; the
decisions built on this state live in :mod:`._policy`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._errors import ConfigError, DuplicateBackendError, UnknownBackendError

if TYPE_CHECKING:
    from ._events import EvictionReason
    from ._stopping import ProcessRef

__all__ = ("INHERIT", "Backend", "CallState", "Record", "Registry")


class _Inherit(enum.Enum):
    INHERIT = "inherit"

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Final = _Inherit.INHERIT
"""Per-backend setting that follows the supervisor's setting (the default)."""


@dataclass(frozen=True, slots=True)
class Backend:
    """A registered backend, as :meth:`Supervisor.register` returned it."""

    address: str
    model: str
    pid: int | None
    pinned: bool = False
    idle_timeout: float | _Inherit | None = INHERIT
    size: int | None = None
    max_concurrency: int | _Inherit | None = INHERIT


class CallState(enum.IntEnum):
    """Where one ``busy()`` call's message stands with the consumer."""

    NEW = -1  # made, not entered yet (a handle is entered once)
    QUEUED = 0  # entered; its mark is on the queue
    ENDED_QUEUED = 1  # entered and left before its mark was applied: one message for both
    ACTIVE = 2  # mark applied: counted in flight
    EXIT_QUEUED = 3  # left; its unmark is on the queue
    DONE = 4  # fully applied


class Call:
    """What the registry needs of one in-flight call (the supervisor's handle subclasses it)."""

    __slots__ = ("entered_at", "exited_at", "record", "state")

    def __init__(self, record: Record, entered_at: float) -> None:
        self.record = record
        self.entered_at = entered_at
        self.exited_at = entered_at
        self.state = CallState.QUEUED


class Record:
    """Mutable per-backend state. Only the registry and the supervisor touch it."""

    __slots__ = (
        "__weakref__",
        "address",
        "attempted",
        "busy_scheduled",
        "calls",
        "claimed",
        "draining",
        "evicted",
        "idle_scheduled",
        "idle_since",
        "idle_timeout",
        "last_progress",
        "last_used",
        "limiter",
        "max_concurrency",
        "model",
        "pinned",
        "process",
        "public",
        "registered",
        "size",
        "stop",
        "stopping",
    )

    def __init__(
        self,
        *,
        address: str,
        model: str,
        now: float,
        process: ProcessRef | None,
        pinned: bool,
        idle_timeout: float | _Inherit | None,
        size: int | None,
        max_concurrency: int | _Inherit | None,
    ) -> None:
        self.address = address
        self.model = model
        self.process = process
        self.pinned = pinned
        self.idle_timeout = idle_timeout
        self.size = size
        self.max_concurrency = max_concurrency
        self.calls: set[Call] = set()
        self.last_progress = now
        self.idle_since = now  # never used: idle from registration
        self.last_used = now  # registration counts as a use
        self.busy_scheduled = False
        self.idle_scheduled = False
        self.registered = True
        self.stopping: EvictionReason | None = None  # chosen for eviction: takes no new calls
        self.claimed = False  # a make_room call counts on this stop to free a slot
        self.draining = 0  # unforced evict() calls waiting for its calls to end
        self.attempted = 0  # eviction attempts (failed stops stay tracked)
        self.stop: Any = None  # the supervisor's shared stop in progress, if any
        self.evicted: Any = None  # the Eviction that untracked it (set when stopped ok)
        self.limiter: Any = None  # the supervisor's admission limiter, if limited
        self.public = Backend(
            address=address,
            model=model,
            pid=None if process is None else process.pid,
            pinned=pinned,
            idle_timeout=idle_timeout,
            size=size,
            max_concurrency=max_concurrency,
        )

    @property
    def inflight(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        return f"<Record {self.address!r} model={self.model!r} inflight={len(self.calls)}>"


class DeadlineHeap:
    """A min-heap of (deadline, record) with lazy deletion: entries may be stale (too early);
    whoever pops one checks the record's real deadline and pushes it again if it moved later."""

    __slots__ = ("_counter", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Record]] = []
        self._counter = itertools.count()

    def push(self, deadline: float, record: Record) -> None:
        heapq.heappush(self._heap, (deadline, next(self._counter), record))

    def peek(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_until(self, now: float) -> list[Record]:
        """Every record whose entry is at or before ``now`` (their entries removed)."""
        heap = self._heap
        popped = []
        while heap and heap[0][0] <= now:
            popped.append(heapq.heappop(heap)[2])
        return popped

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)


def _check_address(address: object) -> str:
    if not isinstance(address, str) or not address:
        raise ConfigError(f"address must be a non-empty string, got {address!r}")
    return address


class Registry:
    """Tracked backends in least-recently-used order, with their in-flight calls."""

    __slots__ = ("busy_heap", "idle_heap", "records")

    def __init__(self) -> None:
        # Insertion order is LRU order: a use moves the record to the end.
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.busy_heap = DeadlineHeap()
        self.idle_heap = DeadlineHeap()

    # -- membership -------------------------------------------------------------------------

    def add(self, record: Record) -> Record:
        _check_address(record.address)
        if record.address in self.records:
            raise DuplicateBackendError(record.address)
        self.records[record.address] = record
        return record

    def get(self, address: str) -> Record:
        record = self.records.get(address)
        if record is None:
            raise UnknownBackendError(_check_address(address))
        return record

    def remove(self, record: Record) -> None:
        """Untrack ``record`` (heap entries for it go stale and are dropped when popped)."""
        if self.records.get(record.address) is record:
            del self.records[record.address]
        record.registered = False

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        """Least recently used first."""
        return iter(self.records.values())

    def find_model(self, model: str) -> Record | None:
        """The most recently used live backend serving ``model``, if any."""
        for record in reversed(self.records.values()):
            if record.model == model and record.stopping is None:
                return record
        return None

    # -- uses -------------------------------------------------------------------------------

    def _use(self, record: Record, at: float) -> None:
        if at > record.last_used:
            record.last_used = at
        self.records.move_to_end(record.address)

    def touch(self, record: Record, at: float) -> None:
        if record.registered:
            self._use(record, at)

    def apply(self, call: Call) -> bool:
        """Apply one queued message for ``call``. True when the backend changed between busy
        and idle (its deadlines need scheduling, and waiters for an idle backend may go on)."""
        record = call.record
        state = call.state
        if state is CallState.ENDED_QUEUED:
            # Entered and left before the mark was applied: a use, and idle from its exit. No
            # decision saw it in flight (every decision applies the queue first), so the
            # backend did not change between busy and idle for anyone.
            call.state = CallState.DONE
            if call.entered_at > record.last_progress:  # an enter is progress
                record.last_progress = call.entered_at
            if record.registered:
                at = call.exited_at
                if at > record.last_used:
                    record.last_used = at
                self.records.move_to_end(record.address)
                if not record.calls and at > record.idle_since:
                    record.idle_since = at
            return False
        if state is CallState.QUEUED:
            call.state = CallState.ACTIVE
            calls = record.calls
            calls.add(call)
            at = call.entered_at
            if at > record.last_progress:
                record.last_progress = at
            if record.registered:
                self._use(record, at)
            return len(calls) == 1
        if state is CallState.EXIT_QUEUED:
            call.state = CallState.DONE
            record.calls.discard(call)
            if not record.registered:
                return False
            self._use(record, call.exited_at)
            if record.calls:
                return False
            record.idle_since = call.exited_at
            return True
        return False
