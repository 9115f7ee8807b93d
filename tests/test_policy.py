"""The pure core: registry state and policy decisions with plain data and a number for now.

No event loop, no processes: these are plain synchronous tests.
"""

from __future__ import annotations

import pytest

from watchdog_async import (
    INHERIT,
    ConfigError,
    DeviceMemory,
    DuplicateBackendError,
    EvictionReason,
    MemoryReading,
    Settings,
    UnknownBackendError,
)
from watchdog_async import _policy as policy
from watchdog_async._registry import Call, CallState, Record, Registry

GiB = 1024**3


def make(
    registry: Registry,
    address: str,
    now: float = 0.0,
    *,
    pinned: bool = False,
    idle_timeout: float | object | None = INHERIT,
    model: str | None = None,
) -> Record:
    record = Record(
        address=address,
        model=model or f"model-{address}",
        now=now,
        process=None,
        pinned=pinned,
        idle_timeout=idle_timeout,  # type: ignore[arg-type]
        size=None,
        max_concurrency=INHERIT,
    )
    return registry.add(record)


def enter(registry: Registry, record: Record, at: float) -> Call:
    call = Call(record, at)
    registry.apply(call)
    return call


def leave(registry: Registry, call: Call, at: float) -> bool:
    call.exited_at = at
    call.state = CallState.EXIT_QUEUED
    return registry.apply(call)


def addresses(records: list[Record]) -> list[str]:
    return [r.address for r in records]


# -- registry ------------------------------------------------------------------------------


def test_duplicate_and_unknown_addresses_are_refused() -> None:
    registry = Registry()
    make(registry, "a")
    with pytest.raises(DuplicateBackendError):
        make(registry, "a")
    with pytest.raises(UnknownBackendError):
        registry.get("b")
    with pytest.raises(ConfigError):
        make(registry, "")
    assert len(registry) == 1


def test_reference_counting_two_calls_on_one_backend() -> None:
    registry = Registry()
    record = make(registry, "a")
    first = enter(registry, record, 1.0)
    second = enter(registry, record, 2.0)
    assert record.inflight == 2
    assert leave(registry, first, 3.0) is False  # still busy: one call left
    assert record.inflight == 1
    assert leave(registry, second, 4.0) is True  # went idle
    assert record.inflight == 0
    assert record.idle_since == 4.0


def test_call_that_ends_before_its_mark_is_applied_is_one_message() -> None:
    registry = Registry()
    record = make(registry, "a")
    call = Call(record, 5.0)
    call.exited_at = 6.0
    call.state = CallState.ENDED_QUEUED
    assert registry.apply(call) is False  # no decision saw it busy: not a transition
    assert record.inflight == 0
    assert record.idle_since == 6.0
    assert record.last_used == 6.0
    assert call.state is CallState.DONE


def test_lru_order_follows_enter_exit_and_touch() -> None:
    registry = Registry()
    a, b, c = (make(registry, x, now) for x, now in (("a", 0), ("b", 1), ("c", 2)))
    assert [r.address for r in registry] == ["a", "b", "c"]
    registry.touch(a, 3.0)
    assert [r.address for r in registry] == ["b", "c", "a"]
    call = enter(registry, b, 4.0)
    assert [r.address for r in registry] == ["c", "a", "b"]
    registry.touch(c, 5.0)
    leave(registry, call, 6.0)
    assert [r.address for r in registry] == ["a", "c", "b"]


# -- deadlines -------------------------------------------------------------------------------


def test_idle_time_runs_from_registration_for_a_backend_never_called() -> None:
    registry, settings = Registry(), Settings(idle_timeout=10)
    record = make(registry, "a", now=100.0)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 109.9, settings) == []
    assert policy.due(registry, 110.0, settings) == [(record, EvictionReason.IDLE_TIMEOUT)]


def test_idle_deadline_moves_when_the_backend_is_used() -> None:
    registry, settings = Registry(), Settings(idle_timeout=10)
    record = make(registry, "a", now=0.0)
    policy.schedule(registry, record, settings)
    call = enter(registry, record, 5.0)
    policy.schedule(registry, record, settings)
    leave(registry, call, 8.0)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 10.0, settings) == []  # stale entry re-pushed at 18
    assert policy.next_deadline(registry) == 18.0
    assert policy.due(registry, 18.0, settings) == [(record, EvictionReason.IDLE_TIMEOUT)]


def test_busy_timer_runs_from_last_progress() -> None:
    registry, settings = Registry(), Settings(busy_timeout=5)
    record = make(registry, "a")
    enter(registry, record, 0.0)
    policy.schedule(registry, record, settings)
    record.last_progress = 4.0  # what handle.progress() does
    assert policy.due(registry, 5.0, settings) == []
    assert policy.next_deadline(registry) == 9.0
    assert policy.due(registry, 9.0, settings) == [(record, EvictionReason.BUSY_TIMEOUT)]


def test_busy_backend_is_not_idle_and_idle_backend_is_not_hung() -> None:
    registry, settings = Registry(), Settings(busy_timeout=5, idle_timeout=5)
    record = make(registry, "a")
    policy.schedule(registry, record, settings)
    call = enter(registry, record, 1.0)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 5.5, settings) == []  # busy: no idle eviction
    leave(registry, call, 2.0)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 6.5, settings) == []  # idle since 2: not hung, not idle yet
    assert policy.due(registry, 7.0, settings) == [(record, EvictionReason.IDLE_TIMEOUT)]


def test_per_backend_idle_timeout_overrides_and_none_means_never() -> None:
    registry, settings = Registry(), Settings(idle_timeout=10)
    short = make(registry, "short", idle_timeout=2.0)
    never = make(registry, "never", idle_timeout=None)
    default = make(registry, "default")
    for record in (short, never, default):
        policy.schedule(registry, record, settings)
    assert policy.due(registry, 2.0, settings) == [(short, EvictionReason.IDLE_TIMEOUT)]
    assert policy.due(registry, 1000.0, settings) == [(default, EvictionReason.IDLE_TIMEOUT)]
    assert policy.idle_deadline(never, settings) is None


def test_pinned_is_never_idle_evicted_but_is_stopped_when_hung() -> None:
    registry, settings = Registry(), Settings(busy_timeout=5, idle_timeout=5)
    record = make(registry, "a", pinned=True)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 100.0, settings) == []
    enter(registry, record, 100.0)
    policy.schedule(registry, record, settings)
    assert policy.due(registry, 105.0, settings) == [(record, EvictionReason.BUSY_TIMEOUT)]


def test_reschedule_all_applies_a_lowered_timeout() -> None:
    registry, settings = Registry(), Settings(idle_timeout=100)
    record = make(registry, "a")
    policy.schedule(registry, record, settings)
    lowered = settings.replace(idle_timeout=1)
    policy.reschedule_all(registry, lowered)
    assert policy.due(registry, 1.0, lowered) == [(record, EvictionReason.IDLE_TIMEOUT)]


def test_removed_backends_are_dropped_from_the_heaps() -> None:
    registry, settings = Registry(), Settings(idle_timeout=1)
    record = make(registry, "a")
    policy.schedule(registry, record, settings)
    registry.remove(record)
    assert policy.due(registry, 10.0, settings) == []
    assert policy.next_deadline(registry) is None


# -- LRU (LocalAI's EnforceLRULimit scenarios) -------------------------------------------------


def test_room_needed_is_localai_formula() -> None:
    assert policy.room_needed(loaded=2, pending=0, max_loaded=2) == 1
    assert policy.room_needed(loaded=3, pending=0, max_loaded=1) == 3
    assert policy.room_needed(loaded=2, pending=1, max_loaded=2) == 2
    assert policy.room_needed(loaded=5, pending=3, max_loaded=0) == 0  # unlimited
    assert policy.room_needed(loaded=0, pending=0, max_loaded=2) == 0


def test_lru_victims_oldest_first_idle_before_busy() -> None:
    registry = Registry()
    a, b, c = make(registry, "a", 0), make(registry, "b", 1), make(registry, "c", 2)
    enter(registry, a, 3.0)  # a is busy (and now the most recent)
    assert addresses(policy.lru_victims(registry, 1, force=False)) == ["b"]
    assert addresses(policy.lru_victims(registry, 3, force=False)) == ["b", "c"]
    assert addresses(policy.lru_victims(registry, 3, force=True)) == ["b", "c", "a"]
    c.pinned = True
    assert addresses(policy.lru_victims(registry, 3, force=True)) == ["b", "a"]
    b.stopping = EvictionReason.LRU
    assert addresses(policy.lru_victims(registry, 3, force=True)) == ["a"]
    assert addresses(policy.lru_victims(registry, 3, force=True, exclude={a})) == []
    assert policy.lru_victims(registry, 0, force=True) == []


def test_two_busy_without_force_gives_nothing() -> None:
    registry = Registry()
    a, b = make(registry, "a", 0), make(registry, "b", 1)
    enter(registry, a, 2.0)
    enter(registry, b, 3.0)
    assert policy.lru_victims(registry, 1, force=False) == []
    assert addresses(policy.lru_victims(registry, 1, force=True)) == ["a"]


# -- memory ----------------------------------------------------------------------------------


def gpu(
    index: int, used: float, total: float = 80, processes: dict[int, int] | None = None
) -> DeviceMemory:
    return DeviceMemory(
        index=index,
        name=f"gpu{index}",
        total=int(total * GiB),
        used=int(used * GiB),
        processes=processes,
    )


def test_over_threshold_is_per_device_not_summed() -> None:
    reading = MemoryReading(devices=(gpu(0, 78), gpu(1, 10)))
    # summed, 88/160 = 55% would be under a 90% threshold: per device, gpu0 is over
    assert [d.index for d in policy.over_threshold(reading, 0.9)] == [0]
    assert policy.over_threshold(reading, 0.99) == []


def test_memory_victims_holders_first_then_lru_busy_only_with_force() -> None:
    registry = Registry()
    a, b, _c, d = (make(registry, x, i) for i, x in enumerate("abcd"))
    enter(registry, d, 10.0)
    held = {"c": 5 * GiB, "b": 9 * GiB}
    assert addresses(policy.memory_victims(registry, held, force=False)) == ["b", "c", "a"]
    assert addresses(policy.memory_victims(registry, held, force=True)) == ["b", "c", "a", "d"]
    a.pinned = True
    assert addresses(policy.memory_victims(registry, {}, force=False, exclude={b})) == ["c"]


def test_fit_deficit_picks_the_best_device() -> None:
    devices = (gpu(0, 70), gpu(1, 60))
    missing, device = policy.fit_deficit(devices, 20 * GiB, threshold=0.9)
    # gpu1: 60 + 20 = 80 > 72 -> 8 GiB missing; gpu0: 18 GiB missing
    assert device is not None and device.index == 1
    assert missing == 8 * GiB
    assert policy.fit_deficit(devices, 5 * GiB, threshold=0.9) == (0, devices[1])  # 75 > 72
    assert policy.fit_deficit((), 5, threshold=0.9) == (5, None)
    assert policy.fit_deficit(devices, 20 * GiB, threshold=None)[0] == 0  # 1.0: 60+20 <= 80


def test_memory_released() -> None:
    assert policy.memory_released(gpu(0, 70), gpu(0, 50))
    assert not policy.memory_released(gpu(0, 70), gpu(0, 70))
