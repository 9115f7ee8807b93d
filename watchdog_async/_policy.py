"""Every rule of the supervisor, as pure functions over plain data.

State (a :class:`Registry`), ``now`` (a number), settings and memory readings go in; decisions
come out. Nothing here awaits, sleeps, signals or reads hardware; the only state touched is the
registry's deadline-heap bookkeeping.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from ._events import EvictionReason
from ._registry import INHERIT, Record, Registry

if TYPE_CHECKING:
    from ._memory import DeviceMemory, MemoryReading
    from ._settings import Settings

__all__ = (
    "above",
    "busy_deadline",
    "due",
    "fit_deficit",
    "held_on",
    "idle_deadline",
    "lru_victims",
    "max_concurrency",
    "memory_released",
    "memory_victims",
    "next_deadline",
    "over_threshold",
    "reschedule_all",
    "room_needed",
    "schedule",
    "stop_failed",
)


# -- deadlines -------------------------------------------------------------------------------


def busy_deadline(record: Record, settings: Settings) -> float | None:
    """Busy timer: from the last progress (enter or ``progress()``) while any call is in flight.
    Pinned backends are still stopped when hung."""
    if settings.busy_timeout is None or not record.calls:
        return None
    return record.last_progress + settings.busy_timeout


def idle_deadline(record: Record, settings: Settings) -> float | None:
    """Idle timer: from the moment the count reached 0 (or registration); the backend's own
    ``idle_timeout`` wins over the global one; pinned and stopping backends have none."""
    if record.calls or record.pinned or record.stopping is not None:
        return None
    timeout = settings.idle_timeout if record.idle_timeout is INHERIT else record.idle_timeout
    if timeout is None:
        return None
    return record.idle_since + timeout


def max_concurrency(record: Record, settings: Settings) -> int | None:
    """At most this many calls in flight on the backend (None: unlimited)."""
    limit = record.max_concurrency
    return settings.max_concurrency if limit is INHERIT else limit


def schedule(registry: Registry, record: Record, settings: Settings) -> bool:
    """Make sure the heap that matters for the record's state holds an entry for it; True
    when an entry was pushed. At most one entry per heap per record; entries may be early,
    never late."""
    if record.calls:
        if record.busy_scheduled or settings.busy_timeout is None:
            return False
        deadline = busy_deadline(record, settings)
        if deadline is None:
            return False
        registry.busy_heap.push(deadline, record)
        record.busy_scheduled = True
        return True
    if record.idle_scheduled or (settings.idle_timeout is None and record.idle_timeout is INHERIT):
        return False
    deadline = idle_deadline(record, settings)
    if deadline is None:
        return False
    registry.idle_heap.push(deadline, record)
    record.idle_scheduled = True
    return True


def reschedule_all(registry: Registry, settings: Settings) -> None:
    """After a timeout setting changes every deadline may move: rebuild both heaps."""
    registry.busy_heap.clear()
    registry.idle_heap.clear()
    for record in registry:
        record.busy_scheduled = record.idle_scheduled = False
        schedule(registry, record, settings)


def next_deadline(registry: Registry) -> float | None:
    """The earliest busy or idle deadline (possibly early: the loop then re-checks)."""
    busy, idle = registry.busy_heap.peek(), registry.idle_heap.peek()
    if busy is None:
        return idle
    if idle is None:
        return busy
    return min(busy, idle)


def due(registry: Registry, now: float, settings: Settings) -> list[tuple[Record, EvictionReason]]:
    """Backends past their busy deadline (hung) or idle deadline, at ``now``."""
    found: list[tuple[Record, EvictionReason]] = []
    for record in registry.busy_heap.pop_until(now):
        record.busy_scheduled = False
        if not record.registered:
            continue
        deadline = busy_deadline(record, settings)
        if deadline is None:
            schedule(registry, record, settings)  # went idle meanwhile
        elif deadline > now:
            registry.busy_heap.push(deadline, record)  # progress moved it later
            record.busy_scheduled = True
        else:
            found.append((record, EvictionReason.BUSY_TIMEOUT))
    for record in registry.idle_heap.pop_until(now):
        record.idle_scheduled = False
        if not record.registered:
            continue
        deadline = idle_deadline(record, settings)
        if deadline is None:
            schedule(registry, record, settings)  # busy, pinned or stopping meanwhile
        elif deadline > now:
            registry.idle_heap.push(deadline, record)
            record.idle_scheduled = True
        else:
            found.append((record, EvictionReason.IDLE_TIMEOUT))
    return found


def stop_failed(record: Record, now: float) -> None:
    """A backend that could not be stopped stays tracked and takes calls again; its idle timer
    starts again from now, so the retry is one idle timeout away, not immediate."""
    record.stopping = None
    if now > record.idle_since:
        record.idle_since = now
    if now > record.last_progress:  # a hung one: the busy retry is one busy timeout away
        record.last_progress = now


# -- least recently used -----------------------------------------------------------------------


def room_needed(loaded: int, pending: int, max_loaded: int) -> int:
    """How many backends to evict before one more load (LocalAI's formula); 0 = unlimited."""
    if max_loaded <= 0:
        return 0
    return max(0, loaded + pending + 1 - max_loaded)


def _evictable(record: Record, exclude: Collection[Record]) -> bool:
    return not record.pinned and record.stopping is None and record not in exclude


def lru_victims(
    registry: Registry, count: int, *, force: bool, exclude: Collection[Record] = ()
) -> list[Record]:
    """Up to ``count`` backends to evict: least recently used first, idle before busy, pinned
    and already-stopping never, busy only with ``force``."""
    if count <= 0:
        return []
    idle: list[Record] = []
    busy: list[Record] = []
    for record in registry:
        if not _evictable(record, exclude):
            continue
        if not record.calls:
            idle.append(record)
            if len(idle) == count:
                break
        elif force and len(busy) < count:
            busy.append(record)
    return (idle + busy)[:count]


# -- memory ----------------------------------------------------------------------------------


def above(device: DeviceMemory, fraction: float) -> bool:
    """The device's used fraction is above ``fraction`` (at it is fine: hysteresis)."""
    return device.total > 0 and device.used / device.total > fraction


def over_threshold(reading: MemoryReading, threshold: float) -> list[DeviceMemory]:
    """Devices whose used fraction is above the threshold."""
    return [d for d in reading.devices if above(d, threshold)]


def memory_victims(
    registry: Registry,
    held: Mapping[str, int],
    *,
    force: bool,
    exclude: Collection[Record] = (),
) -> list[Record]:
    """Eviction order for one device: backends holding memory on it first (most bytes first),
    then least recently used; idle before busy; busy only with ``force``; pinned never.
    ``held`` maps an address to the bytes its process tree holds on that device."""
    candidates = [r for r in registry if _evictable(r, exclude) and (force or not r.calls)]
    # stable sort: idle before busy, then holders by bytes (desc), then LRU order
    return sorted(candidates, key=lambda r: (bool(r.calls), -held.get(r.address, 0)))


def held_on(
    device: DeviceMemory, records: Iterable[Record], trees: Mapping[str, Iterable[int]]
) -> dict[str, int]:
    """Bytes each backend holds on ``device``: the per-process figures of its process tree
    (``trees``: address -> pids of the registered process and its descendants) where the
    device has them, else the ``size`` declared at registration."""
    if device.processes is None:
        return {r.address: r.size for r in records if r.size}
    per_pid = device.processes
    held: dict[str, int] = {}
    for record in records:
        total = sum(per_pid.get(pid, 0) for pid in trees.get(record.address, ()))
        if total:
            held[record.address] = total
    return held


def fit_deficit(
    devices: Iterable[DeviceMemory], needed: int, threshold: float | None
) -> tuple[int, DeviceMemory | None]:
    """Bytes still missing for ``needed`` to fit on the best device while staying at or under
    the threshold (1.0 when the reclaimer is off), and that device. (0, device) when it fits;
    (needed, None) when there are no devices at all."""
    limit = 1.0 if threshold is None else threshold
    best: tuple[int, DeviceMemory | None] = (needed, None)
    for device in devices:
        missing = max(0, int(device.used + needed - limit * device.total))
        if best[1] is None or missing < best[0]:
            best = (missing, device)
    return best


def memory_released(before: DeviceMemory, after: DeviceMemory) -> bool:
    """The driver has given back memory after a stop."""
    return after.used < before.used
