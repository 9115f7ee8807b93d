"""The Supervisor core: LocalAI's watchdog scenarios ported, busy tracking, deadlines, make_room,
live configuration and bad input. Time is driven by a ManualClock (or looptime), never slept."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import anyio
import looptime
import pytest
from _support import OpenSup, Recorder
from loguru import logger

from watchdog_async import (
    Backend,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    DuplicateBackendError,
    Eviction,
    EvictionReason,
    Supervisor,
    SupervisorClosedError,
    UnknownBackendError,
)
from watchdog_async.testing import ManualClock, settle


def register_all(sup: Supervisor, clock: ManualClock, *addresses: str) -> None:
    for address in addresses:
        sup.register(address, f"model-{address}")
        clock.advance(1)


# -- LocalAI watchdog_test.go, ported ----------------------------------------------------------


async def test_limit_getters_and_setters(open_sup: Callable[..., Any]) -> None:
    sup = await open_sup(max_loaded=2, memory_threshold=0.9)
    assert sup.settings.max_loaded == 2
    assert sup.configure(max_loaded=5).max_loaded == 5
    assert sup.settings.max_loaded == 5
    sup.configure(memory_threshold=0.8)
    assert sup.settings.memory_threshold == 0.8
    assert sup.settings.effective_memory_target == pytest.approx(0.75)


async def test_loaded_count(open_sup: Callable[..., Any], clock: ManualClock) -> None:
    sup = await open_sup()
    assert sup.loaded_count == 0
    register_all(sup, clock, "a", "b")
    assert sup.loaded_count == 2
    sup.forget("a")
    assert sup.loaded_count == 1


async def test_limit_2_with_idle_backends_evicts_the_oldest(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=2)
    register_all(sup, clock, "a", "b")
    evictions = await sup.make_room()
    assert [(e.address, e.reason, e.ok) for e in evictions] == [("a", EvictionReason.LRU, True)]
    assert recorder.stopped == ["a"]
    assert sup.loaded_count == 1


async def test_lowering_the_limit_to_1_with_three_loaded_evicts_three(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=3)
    register_all(sup, clock, "a", "b", "c")
    sup.configure(max_loaded=1)
    evictions = await sup.make_room()  # 3 + 0 + 1 - 1 = 3
    assert [e.address for e in evictions] == ["a", "b", "c"]
    assert recorder.stopped == ["a", "b", "c"]
    assert sup.loaded_count == 0


async def test_pending_loads_are_counted(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=3)
    register_all(sup, clock, "a", "b", "c")
    evictions = await sup.make_room(pending=1)
    assert [e.address for e in evictions] == ["a", "b"]  # 3 + 1 + 1 - 3 = 2
    assert sup.loaded_count == 1


async def test_limit_0_evicts_nothing(open_sup: Callable[..., Any], clock: ManualClock) -> None:
    sup = await open_sup(max_loaded=0)
    register_all(sup, clock, *"abcdef")
    assert await sup.make_room(pending=10) == []
    assert sup.loaded_count == 6


async def test_touch_changes_the_order(open_sup: Callable[..., Any], clock: ManualClock) -> None:
    sup = await open_sup(max_loaded=2)
    register_all(sup, clock, "a", "b")
    sup.touch("a")
    evictions = await sup.make_room()
    assert [e.address for e in evictions] == ["b"]


async def test_limit_1_over_five_loads(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=1)
    for address in "abcde":
        await sup.make_room()
        sup.register(address, f"model-{address}")
        clock.advance(1)
        assert sup.loaded_count == 1
    assert recorder.stopped == ["a", "b", "c", "d"]


async def test_busy_backends_skipped_without_force_evicted_with_it(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup(max_loaded=2)
    register_all(sup, clock, "a", "b")
    entered, release = anyio.Event(), anyio.Event()
    failure: list[BackendStoppedError] = []

    async def hold() -> None:
        try:
            async with sup.busy("a"):
                entered.set()
                await release.wait()
        except BackendStoppedError as exc:
            failure.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await entered.wait()
        assert [e.address for e in await sup.make_room()] == ["b"]  # a is busy: skipped
        sup.configure(max_loaded=1)
        with pytest.raises(CapacityError):
            await sup.make_room(timeout=0)  # only 'a' is left, and it is busy
        evictions = await sup.make_room(force=True, timeout=0)
        assert [e.address for e in evictions] == ["a"]
    assert len(failure) == 1
    assert failure[0].reason is EvictionReason.LRU


async def test_two_busy_without_force_raise_capacity_error(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=2)
    register_all(sup, clock, "a", "b")
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        for address in "ab":
            tg.start_soon(_hold, sup, address, release)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CapacityError) as caught:
            await sup.make_room(timeout=0)
        assert caught.value.evictions == ()
        release.set()
    assert recorder.stopped == []
    assert sup.loaded_count == 2


async def test_one_idle_between_two_busy_at_limit_1(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(max_loaded=1)
    register_all(sup, clock, "a", "b", "c")
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, sup, "a", release)
        tg.start_soon(_hold, sup, "c", release)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CapacityError) as caught:
            await sup.make_room(timeout=0)
        assert [e.address for e in caught.value.evictions] == ["b"]
        release.set()
    assert recorder.stopped == ["b"]
    assert sup.loaded_count == 2


async def _hold(sup: Supervisor, address: str, release: anyio.Event) -> None:
    async with sup.busy(address):
        await release.wait()


# -- busy tracking ---------------------------------------------------------------------------


async def test_two_concurrent_calls_are_reference_counted(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    first, second = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, sup, "a", first)
        tg.start_soon(_hold, sup, "a", second)
        await anyio.wait_all_tasks_blocked()
        assert sup.snapshot()[0].inflight == 2
        first.set()
        await anyio.wait_all_tasks_blocked()
        assert sup.snapshot()[0].inflight == 1
        assert sup.snapshot()[0].idle_for is None
        second.set()
    status = sup.snapshot()[0]
    assert status.inflight == 0
    assert status.busy_for is None
    assert status.idle_for == 0.0


async def test_a_call_entered_is_seen_in_flight_at_once(open_sup: Callable[..., Any]) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    async with sup.busy("a"):
        # no await since entering: the mark is still queued, yet reads apply it first
        assert sup.snapshot()[0].inflight == 1


async def test_progress_keeps_a_long_call_alive(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(busy_timeout=10)
    sup.register("a", "m")
    async with sup.busy("a") as call:
        for _ in range(10):  # 50 s in all, never 10 s without progress
            clock.advance(5)
            call.progress()
            await settle(sup)
    assert recorder.stopped == []
    assert sup.loaded_count == 1


async def test_busy_timeout_fails_the_caller_with_backend_stopped(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(busy_timeout=10)
    sup.register("a", "m")
    events = sup.events()
    caught: list[BackendStoppedError] = []

    async def hung_call() -> None:
        try:
            async with sup.busy("a"):
                await anyio.sleep_forever()
        except BackendStoppedError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hung_call)
        await anyio.wait_all_tasks_blocked()
        clock.advance(9.9)
        await settle(sup)
        assert caught == []
        clock.advance(0.2)
        await settle(sup)
    assert len(caught) == 1 and caught[0].reason is EvictionReason.BUSY_TIMEOUT
    assert recorder.stopped == ["a"]
    eviction = await events.__anext__()
    assert (eviction.address, eviction.reason, eviction.ok) == (
        "a",
        EvictionReason.BUSY_TIMEOUT,
        True,
    )
    assert sup.loaded_count == 0


async def test_idle_time_from_registration_for_a_backend_never_called(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup = await open_sup(idle_timeout=60)
    sup.register("a", "m")
    clock.advance(59)
    await settle(sup)
    assert sup.loaded_count == 1
    clock.advance(1)
    await settle(sup)
    assert sup.loaded_count == 0
    assert recorder.stopped == ["a"]


async def test_pinned_backend_is_not_unloaded_when_idle(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup(idle_timeout=1, max_loaded=1)
    sup.register("a", "m", pinned=True)
    clock.advance(100)
    await settle(sup)
    assert sup.loaded_count == 1
    with pytest.raises(CapacityError):
        await sup.make_room(timeout=0, force=True)


async def test_make_room_wakes_when_a_call_ends(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup(max_loaded=1)
    sup.register("a", "m")
    release = anyio.Event()
    result: list[Eviction] = []

    async def wait_for_room() -> None:
        result.extend(await sup.make_room(timeout=3600))

    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, sup, "a", release)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(wait_for_room)
        await anyio.wait_all_tasks_blocked()
        assert result == []  # still waiting: 'a' is busy
        release.set()
    assert [e.address for e in result] == ["a"]


async def test_a_backend_chosen_for_eviction_refuses_new_calls(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    recorder.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.evict, "a")
        await anyio.wait_all_tasks_blocked()
        assert recorder.stopped == ["a"]  # the stop is under way
        with pytest.raises(BackendStoppedError) as caught:
            async with sup.busy("a"):
                pass
        assert caught.value.reason is EvictionReason.MANUAL
        recorder.gate.set()
    assert sup.loaded_count == 0


async def test_cancellation_inside_busy_is_recorded(open_sup: Callable[..., Any]) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    with anyio.move_on_after(0.01):
        async with sup.busy("a"):
            await anyio.sleep_forever()
    assert sup.snapshot()[0].inflight == 0


async def test_callers_own_errors_pass_through_unchanged(open_sup: Callable[..., Any]) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    error = KeyError("mine")
    with pytest.raises(KeyError) as caught:
        async with sup.busy("a"):
            raise error
    assert caught.value is error
    assert sup.snapshot()[0].inflight == 0


async def test_outside_cancellation_wins_over_a_forced_stop(
    open_sup: Callable[..., Any],
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    outcome: list[str] = []

    async def call() -> None:
        try:
            async with sup.busy("a"):
                await anyio.sleep_forever()
        except BackendStoppedError:
            outcome.append("stopped")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
        await sup.evict("a", force=True)
    assert outcome == ["cancelled"]


async def test_forced_evict_fails_every_caller(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    reasons: list[EvictionReason] = []

    async def call() -> None:
        try:
            async with sup.busy("a"):
                await anyio.sleep_forever()
        except BackendStoppedError as exc:
            reasons.append(exc.reason)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        eviction = await sup.evict("a", force=True)
    assert eviction.ok and eviction.reason is EvictionReason.MANUAL
    assert reasons == [EvictionReason.MANUAL] * 3


async def test_unforced_evict_waits_for_calls_then_gives_up(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup = await open_sup(eviction_timeout=0.05)
    sup.register("a", "m")
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, sup, "a", release)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CapacityError):
            await sup.evict("a")
        assert recorder.stopped == []
        # it takes calls again after giving up
        async with sup.busy("a"):
            pass
        sup.configure(eviction_timeout=3600)
        tg.start_soon(sup.evict, "a")
        await anyio.wait_all_tasks_blocked()
        assert recorder.stopped == []  # waiting for the call in flight
        release.set()
    assert recorder.stopped == ["a"]
    assert sup.loaded_count == 0


# -- stopping failures ---------------------------------------------------------------------------


async def test_failing_callback_keeps_the_backend_tracked(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    recorder.error = RuntimeError("cannot unload")
    eviction = await sup.evict("a")
    assert not eviction.ok
    assert eviction.error is recorder.error
    assert sup.loaded_count == 1
    assert sup.snapshot()[0].stopping is False
    recorder.error = None
    assert (await sup.evict("a")).ok  # tried again
    assert sup.loaded_count == 0
    assert any(key.startswith("stop") for key in sup.faults)


async def test_hanging_callback_is_bounded_by_stop_timeout(
    open_sup: Callable[..., Any], recorder: Recorder
) -> None:
    sup = await open_sup(stop_timeout=0.05)
    sup.register("a", "m")
    recorder.hang = True
    eviction = await sup.evict("a")
    assert not eviction.ok
    assert isinstance(eviction.error, TimeoutError)
    assert sup.loaded_count == 1


# -- configuration ---------------------------------------------------------------------------


async def test_configure_live_loses_no_state(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup(idle_timeout=1000)
    register_all(sup, clock, "a", "b")
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, sup, "a", release)
        await anyio.wait_all_tasks_blocked()
        sup.configure(idle_timeout=10, max_loaded=5)
        assert [s.address for s in sup.snapshot()] == ["b", "a"]
        assert sup.snapshot()[1].inflight == 1
        clock.advance(10)
        await settle(sup)
        assert [s.address for s in sup.snapshot()] == ["a"]  # b idle > 10 s: unloaded
        release.set()


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_threshold": 0.0},
        {"memory_threshold": 1.5},
        {"memory_threshold": 0.8, "memory_target": 0.8},
        {"memory_threshold": math.nan},
        {"busy_timeout": math.nan},
        {"idle_timeout": -1},
        {"stop_timeout": math.inf},
        {"check_interval": 0},
        {"max_loaded": -1},
        {"max_loaded": 1.5},
        {"no_such_setting": 1},
        {"max_loaded": 3, "busy_timeout": "forever"},
    ],
)
async def test_bad_configuration_is_refused_and_changes_nothing(
    open_sup: Callable[..., Any], changes: dict[str, Any]
) -> None:
    sup = await open_sup(max_loaded=2)
    before = sup.settings
    with pytest.raises(ConfigError):
        sup.configure(**changes)
    assert sup.settings is before
    with pytest.raises(ConfigError):
        Supervisor(**changes)


async def test_bad_registration_is_refused_and_changes_nothing(
    open_sup: Callable[..., Any],
) -> None:
    sup = await open_sup()
    sup.register("a", "m")
    with pytest.raises(DuplicateBackendError):
        sup.register("a", "other")
    for bad in ({"address": ""}, {"address": 3}, {"model": ""}):
        kwargs: dict[str, Any] = {"address": "b", "model": "m", **bad}
        with pytest.raises(ConfigError):
            sup.register(kwargs.pop("address"), kwargs.pop("model"))
    for bad_kw in ({"idle_timeout": -1}, {"size": -1}, {"max_concurrency": 0}, {"pinned": "yes"}):
        with pytest.raises(ConfigError):
            sup.register("b", "m", **bad_kw)
    with pytest.raises(UnknownBackendError):
        sup.touch("nope")
    with pytest.raises(UnknownBackendError):
        async with sup.busy("nope"):
            pass
    with pytest.raises(UnknownBackendError):
        await sup.evict("nope")
    with pytest.raises(ConfigError):
        await sup.make_room(pending=-1)
    assert [s.address for s in sup.snapshot()] == ["a"]


async def test_closed_supervisor_refuses_everything(clock: ManualClock) -> None:
    sup = Supervisor(clock=clock)
    with pytest.raises(SupervisorClosedError):
        sup.register("a", "m")
    async with sup:
        sup.register("a", "m")
    for call in (
        lambda: sup.register("b", "m"),
        lambda: sup.touch("a"),
        lambda: sup.forget("a"),
        lambda: sup.events(),
    ):
        with pytest.raises(SupervisorClosedError):
            call()
    with pytest.raises(SupervisorClosedError):
        async with sup.busy("a"):
            pass
    with pytest.raises(SupervisorClosedError):
        await sup.make_room()
    with pytest.raises(SupervisorClosedError):
        async with sup:
            pass


async def test_leaving_stops_every_backend_with_reason_closing(
    clock: ManualClock, recorder: Recorder
) -> None:
    async with Supervisor(shutdown=recorder, clock=clock) as sup:
        register_all(sup, clock, "a", "b")
        events = sup.events()
    assert sorted(recorder.stopped) == ["a", "b"]
    reasons = [e.reason async for e in events]
    assert reasons == [EvictionReason.CLOSING] * 2


async def test_stop_on_exit_false_leaves_backends_alone(
    clock: ManualClock, recorder: Recorder
) -> None:
    async with Supervisor(shutdown=recorder, clock=clock, stop_on_exit=False) as sup:
        register_all(sup, clock, "a")
    assert recorder.stopped == []


async def test_each_subscriber_sees_every_eviction_from_subscription_on(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    sup = await open_sup()
    register_all(sup, clock, "a", "b", "c")
    await sup.evict("a")
    first, second = sup.events(), sup.events(buffer=1)
    await sup.evict("b")
    await sup.evict("c")
    assert [(await first.__anext__()).address for _ in range(2)] == ["b", "c"]
    assert (await second.__anext__()).address == "c"
    assert second.dropped == 1


async def test_runs_in_a_users_task_group(clock: ManualClock, recorder: Recorder) -> None:
    sup = Supervisor(shutdown=recorder, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        sup.register("a", "m")
        assert sup.loaded_count == 1
        tg.cancel_scope.cancel()
    assert recorder.stopped == ["a"]
    with pytest.raises(SupervisorClosedError):
        sup.register("b", "m")


async def test_each_eviction_is_logged_once_enabled_and_nothing_before(
    open_sup: OpenSup, clock: ManualClock
) -> None:
    messages: list[str] = []
    sink = logger.add(messages.append, level="INFO", format="{level} {message}")
    try:
        sup = await open_sup()
        register_all(sup, clock, "a", "b")
        await sup.evict("a")
        assert messages == []  # disabled at import: the application opts in
        logger.enable("watchdog_async")
        try:
            await sup.evict("b")
        finally:
            logger.disable("watchdog_async")
    finally:
        logger.remove(sink)
    evicted = [m for m in messages if "evicted" in m]
    assert len(evicted) == 1
    assert "b (model-b)" in evicted[0]
    assert "reason=manual" in evicted[0]
    assert evicted[0].startswith("INFO")


async def test_readme_testing_example() -> None:
    """The example in README's "Testing your app" (and testing.py's docstring), as written."""
    clock = ManualClock()
    async with Supervisor(idle_timeout=60, clock=clock) as sup:
        sup.register("127.0.0.1:9001", "llama")
        clock.advance(61)
        await settle(sup)
        assert sup.loaded_count == 0


LOOPTIME = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("asyncio", {"loop_factory": looptime.new_event_loop}), id="looptime")],
)


@LOOPTIME
@pytest.mark.parametrize("check_interval", [0.5, 3600.0])
async def test_idle_unload_within_50ms_of_its_deadline_whatever_check_interval(
    check_interval: float,
) -> None:
    """Virtual time (looptime): the supervisor's default clock is the loop's."""
    stopped_at: list[float] = []

    async def shutdown(backend: Backend) -> None:
        stopped_at.append(anyio.current_time())

    async with Supervisor(shutdown=shutdown, idle_timeout=10, check_interval=check_interval) as sup:
        began = anyio.current_time()
        sup.register("a", "m")
        await anyio.sleep(12)  # virtual time (looptime): no real wait
    assert len(stopped_at) == 1
    assert stopped_at[0] - began == pytest.approx(10, abs=0.05)


@LOOPTIME
async def test_the_deadline_loop_does_not_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing due for an hour, the deadline loop wakes only when something changes."""
    from watchdog_async import _policy

    looked = 0
    real_due = _policy.due

    def counting_due(*args: Any, **kwargs: Any) -> Any:
        nonlocal looked
        looked += 1
        return real_due(*args, **kwargs)

    monkeypatch.setattr(_policy, "due", counting_due)
    async with Supervisor(idle_timeout=3600, check_interval=3600) as sup:
        sup.register("a", "m")
        await anyio.sleep(1800)  # virtual (looptime): half an hour with nothing due
        before = looked
        await anyio.sleep(1800 - 1)
        assert looked == before  # no wake-up while nothing changed and nothing was due
        await anyio.sleep(2)  # virtual time
        assert sup.loaded_count == 0  # ...and it woke for the deadline itself
