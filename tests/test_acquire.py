"""``sup.acquire(model, start)``: load once however many callers ask (singleflight), make room
first counting loads in progress, never go over ``max_loaded``, mark every waiting caller busy
before any eviction can see the new backend idle, deliver a failed or hung start to every waiter,
and leave no trace of a cancelled caller.

Most tests use fake backends (``start`` returns ``(address, None)``) and a ManualClock; one uses
real child processes. Timers that must fire (start_timeout, busy_timeout) run on looptime's
virtual clock, so nothing here sleeps for real except the real-process test's stops.
"""

from __future__ import annotations

import random
import subprocess
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import looptime
import pytest
from _children import is_gone, read_line, sleeper_argv, start
from _support import Recorder

from watchdog_async import (
    Backend,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    DeviceMemory,
    DuplicateBackendError,
    Eviction,
    EvictionReason,
    MemoryReading,
    Supervisor,
    SupervisorClosedError,
)
from watchdog_async.testing import ManualClock, ScriptedProbe, gib, settle

# Tests whose timers must really fire run on a virtual-time loop: time jumps when all is idle.
virtual_time = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("asyncio", {"loop_factory": looptime.new_event_loop}), id="looptime")],
)


class Starter:
    """A ``start`` callback for fake backends: every start returns a fresh address.

    ``gate``: starts wait for it; ``errors``: per model, raised by the next start (once);
    ``hang``: starts never return; ``check``: called inside every start (invariants).
    """

    def __init__(self) -> None:
        self.starts: Counter[str] = Counter()
        self.running: Counter[str] = Counter()  # starts in progress, per model
        self.max_running = 0  # most starts in progress at once, all models
        self.addresses: dict[str, list[str]] = defaultdict(list)
        self.gate: anyio.Event | None = None
        self.errors: dict[str, BaseException] = {}
        self.hang = False
        self.cancelled = 0
        self.check: Callable[[str], None] = lambda model: None
        self.checkpoints = 0  # extra scheduling points inside each start
        self.on_return: Callable[[str], object] = lambda model: None

    @property
    def in_progress(self) -> int:
        return sum(self.running.values())

    async def __call__(self, model: str) -> tuple[str, None]:
        assert self.running[model] == 0, f"two starts of {model} at once"
        self.starts[model] += 1
        self.running[model] += 1
        self.max_running = max(self.max_running, self.in_progress)
        try:
            self.check(model)
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(self.checkpoints):
                await anyio.lowlevel.checkpoint()
                self.check(model)
            if self.hang:
                await anyio.sleep_forever()
            error = self.errors.pop(model, None)
            if error is not None:
                raise error
            address = f"127.0.0.1:{model}-{self.starts[model]}"
            self.addresses[model].append(address)
            self.on_return(model)
            return address, None
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.running[model] -= 1


def status(sup: Supervisor, address: str) -> tuple[bool, int]:
    """(stopping, inflight) of a tracked backend; fails if it is not tracked."""
    rows = {row.address: row for row in sup.snapshot()}
    assert address in rows, f"{address} is not registered"
    return rows[address].stopping, rows[address].inflight


def assert_in_use(sup: Supervisor, address: str) -> None:
    """The caller's backend is registered, not being stopped, and counts this call."""
    stopping, inflight = status(sup, address)
    assert not stopping, f"{address} chosen for eviction while a caller is inside"
    assert inflight >= 1


async def collect(sup: Supervisor, into: list[Eviction], check: Callable[[], None]) -> None:
    async for eviction in sup.events():
        into.append(eviction)
        check()


# -- singleflight under load --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_200_callers_5_models_limit_2(open_sup: Callable[..., Any], seed: int) -> None:
    """Each model is started once per load, the limit holds at every moment (loaded + loads in
    progress), and no caller's backend is evicted under it."""
    rng = random.Random(seed)
    models = [f"m{i}" for i in range(5)]
    sup: Supervisor = await open_sup(max_loaded=2)
    starter = Starter()
    starter.checkpoints = 2
    violations: list[str] = []

    def check_limit(where: str) -> None:
        total = sup.loaded_count + starter.in_progress
        if total > 2:
            violations.append(
                f"{where}: {sup.loaded_count} loaded + {starter.in_progress} starting"
            )

    def check_in_start(model: str) -> None:
        check_limit(f"start({model})")
        live = [r for r in sup.snapshot() if r.model == model and not r.stopping]
        if live:
            violations.append(f"start({model}) while {live[0].address} serves it")

    starter.check = check_in_start
    served: dict[str, set[str]] = defaultdict(set)  # model -> addresses that served a caller
    evictions: list[Eviction] = []

    async def caller(model: str) -> None:
        for _ in range(rng.randint(0, 3)):
            await anyio.lowlevel.checkpoint()
        async with sup.acquire(model, starter) as backend:
            assert backend.model == model
            served[model].add(backend.address)
            for _ in range(rng.randint(0, 4)):
                assert_in_use(sup, backend.address)
                check_limit(f"inside {model}")
                await anyio.lowlevel.checkpoint()
            assert_in_use(sup, backend.address)

    async with anyio.create_task_group() as events_tg:
        events_tg.start_soon(collect, sup, evictions, lambda: check_limit("event"))
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(caller, rng.choice(models))  # BackendStoppedError would fail here
        await settle(sup)
        assert not violations, violations[:5]
        assert sup.loaded_count <= 2
        loaded = {row.address: row.model for row in sup.snapshot()}
        assert all(row.inflight == 0 for row in sup.snapshot())
        events_tg.cancel_scope.cancel()

    assert {e.reason for e in evictions} <= {EvictionReason.LRU}
    assert all(e.ok for e in evictions)
    evicted = Counter(e.address for e in evictions)
    assert all(count == 1 for count in evicted.values())
    for model in models:
        started = starter.addresses[model]
        assert starter.starts[model] == len(started)
        # every load is a start: each started address was registered once, and is either
        # evicted once or still loaded
        gone = {a for a in evicted if a.startswith(f"127.0.0.1:{model}-")}
        still = {a for a, m in loaded.items() if m == model}
        assert sorted(gone | still) == sorted(started)
        assert not gone & still
        # singleflight: no load without a caller that used it
        assert served[model] == set(started)
    assert sum(starter.starts.values()) >= len(set(served))
    assert starter.max_running <= 2


async def test_concurrent_callers_share_one_start(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    starter = Starter()
    starter.gate = anyio.Event()
    inside = 0
    all_inside = anyio.Event()
    release = anyio.Event()
    seen: set[str] = set()

    async def caller() -> None:
        nonlocal inside
        async with sup.acquire("llama", starter) as backend:
            seen.add(backend.address)
            inside += 1
            if inside == 50:
                all_inside.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert starter.starts["llama"] == 1
        assert sup.loaded_count == 0  # nothing registered before the start returns
        starter.gate.set()
        await all_inside.wait()
        (address,) = seen
        assert status(sup, address) == (False, 50)
        release.set()
    await settle(sup)
    assert status(sup, address) == (False, 0)
    assert starter.starts["llama"] == 1


async def test_loads_of_different_models_run_concurrently(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup(max_loaded=3)
    starter = Starter()
    starter.gate = anyio.Event()

    async def use(model: str) -> None:
        async with sup.acquire(model, starter):
            pass

    async with anyio.create_task_group() as tg:
        for model in ("a", "b", "c"):
            tg.start_soon(use, model)
        await anyio.wait_all_tasks_blocked()
        assert dict(starter.running) == {"a": 1, "b": 1, "c": 1}
        starter.gate.set()
    assert sup.loaded_count == 3


async def test_an_existing_backend_is_reused(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    starter = Starter()
    async with sup.acquire("m", starter) as first:
        pass
    async with sup.acquire("m", starter) as second:
        assert_in_use(sup, second.address)
    assert first == second
    assert starter.starts["m"] == 1
    sup.register("127.0.0.1:9", "registered")
    async with sup.acquire("registered", starter) as backend:
        assert backend.address == "127.0.0.1:9"
    assert starter.starts["registered"] == 0


async def test_load_makes_room_lru_first(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    sup: Supervisor = await open_sup(max_loaded=2)
    starter = Starter()
    for model in ("a", "b"):
        async with sup.acquire(model, starter):
            clock.advance(1)
    async with sup.acquire("a", starter):  # a is now the most recently used
        clock.advance(1)
    async with sup.acquire("c", starter) as backend:
        assert_in_use(sup, backend.address)
    assert recorder.stopped == ["127.0.0.1:b-1"]
    assert sorted(r.model for r in sup.snapshot()) == ["a", "c"]


async def test_memory_makes_room_before_the_start(
    open_sup: Callable[..., Any], clock: ManualClock, recorder: Recorder
) -> None:
    """acquire(memory=BYTES): backends are evicted (reason memory, LRU here) until the load fits
    under the threshold, before start() runs. Memory is scripted: 2 GiB base + 4 GiB per live
    backend on a 16 GiB device; the threshold 0.9 leaves room for 3."""
    live: set[str] = set()

    def reading() -> MemoryReading:
        used = gib(2) + gib(4) * len(live)
        return MemoryReading(devices=(DeviceMemory(0, "scripted", gib(16), used),))

    class StopFrees(Recorder):
        async def __call__(self, backend: Backend) -> None:
            await super().__call__(backend)
            live.discard(backend.address)

    stopper = StopFrees()
    starter = Starter()

    def check(model: str) -> None:  # the room is made before the start
        assert gib(2) + gib(4) * (len(live) + 1) <= 0.9 * gib(16)

    starter.check = check
    starter.on_return = lambda model: live.add(f"127.0.0.1:{model}-1")
    async with Supervisor(
        shutdown=stopper,
        clock=clock,
        memory_probe=ScriptedProbe(reading),
        memory_threshold=0.9,
        check_interval=3600,
    ) as sup:
        for model in ("a", "b", "c"):
            async with sup.acquire(model, starter, memory=gib(4)):
                clock.advance(1)
        assert stopper.stopped == []
        async with sup.acquire("d", starter, memory=gib(4)) as backend:
            assert_in_use(sup, backend.address)
        assert stopper.stopped == ["127.0.0.1:a-1"]
        assert sorted(r.model for r in sup.snapshot()) == ["b", "c", "d"]


async def test_waiting_callers_get_closed_error_when_the_supervisor_closes(
    recorder: Recorder,
) -> None:
    starter = Starter()
    starter.hang = True
    got: list[BaseException] = []

    async def caller(sup: Supervisor) -> None:
        try:
            async with sup.acquire("m", starter):
                pytest.fail("entered a backend whose start never returned")
        except SupervisorClosedError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg, Supervisor(shutdown=recorder) as sup:
        for _ in range(3):
            tg.start_soon(caller, sup)
        await anyio.wait_all_tasks_blocked()
        assert starter.starts["m"] == 1
    assert len(got) == 3
    assert starter.cancelled == 1  # the start was cancelled, not left running
    assert recorder.stopped == []


async def test_bad_arguments_are_config_errors(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    with pytest.raises(ConfigError):
        sup.acquire("", Starter())
    with pytest.raises(ConfigError):
        sup.acquire("m", "not callable")  # type: ignore[arg-type]
    assert sup.loaded_count == 0


# -- busy before anyone can see it idle -------------------------------------------------------


async def test_waiters_are_busy_before_an_eviction_can_run(open_sup: Callable[..., Any]) -> None:
    """A make_room that runs right after the registration (before any waiter's task resumes)
    finds the new backend busy: it cannot evict it."""
    sup: Supervisor = await open_sup(max_loaded=1)
    starter = Starter()
    outcome: list[object] = []

    async def racer() -> None:
        try:
            outcome.append(await sup.make_room(timeout=0))
        except CapacityError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        # scheduled inside start: it runs after the load's registration, before the caller
        starter.on_return = lambda model: tg.start_soon(racer)
        async with sup.acquire("m", starter) as backend:
            await anyio.wait_all_tasks_blocked()
            assert len(outcome) == 1
            assert isinstance(outcome[0], CapacityError)
            assert_in_use(sup, backend.address)
    assert sup.loaded_count == 1


async def test_idle_timeout_zero_never_unloads_under_a_waiter(
    open_sup: Callable[..., Any],
) -> None:
    """With idle_timeout=0 a backend is due the instant it is idle: every waiter's body still
    sees it registered and in use, and it goes only after the last caller leaves."""
    sup: Supervisor = await open_sup(idle_timeout=0)
    starter = Starter()
    starter.gate = anyio.Event()
    evictions: list[Eviction] = []

    async def caller(rounds: int) -> None:
        async with sup.acquire("m", starter) as backend:
            for _ in range(rounds):
                await anyio.wait_all_tasks_blocked()
                assert_in_use(sup, backend.address)

    async with anyio.create_task_group() as events_tg:
        events_tg.start_soon(collect, sup, evictions, lambda: None)
        async with anyio.create_task_group() as tg:
            for rounds in range(1, 21):
                tg.start_soon(caller, rounds)
            await anyio.wait_all_tasks_blocked()
            starter.gate.set()
        await settle(sup)
        events_tg.cancel_scope.cancel()
    assert [(e.address, e.reason) for e in evictions] == [
        ("127.0.0.1:m-1", EvictionReason.IDLE_TIMEOUT)
    ]
    assert starter.starts["m"] == 1


# -- failed and hung starts -------------------------------------------------------------------


async def test_a_failed_start_reaches_every_waiter_and_registers_nothing(
    open_sup: Callable[..., Any],
) -> None:
    # eviction_timeout=0: a room reservation left behind would make the next load fail at once
    sup: Supervisor = await open_sup(max_loaded=1, eviction_timeout=0)
    starter = Starter()
    starter.gate = anyio.Event()
    boom = RuntimeError("the model file is missing")
    starter.errors["m"] = boom
    got: list[BaseException] = []

    async def caller() -> None:
        try:
            async with sup.acquire("m", starter):
                pytest.fail("entered a backend whose start failed")
        except RuntimeError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        starter.gate.set()
    assert len(got) == 10
    assert all(exc is boom for exc in got)
    assert starter.starts["m"] == 1
    assert sup.loaded_count == 0
    assert sup.snapshot() == []
    # a later acquire starts again, and the slot the failed load reserved is free
    async with sup.acquire("m", starter) as backend:
        assert_in_use(sup, backend.address)
    assert starter.starts["m"] == 2


async def test_a_failed_start_fails_only_its_own_model(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup(max_loaded=2)
    starter = Starter()
    starter.gate = anyio.Event()
    starter.errors["bad"] = ValueError("bad weights")
    results: dict[str, list[str]] = defaultdict(list)

    async def caller(model: str) -> None:
        try:
            async with sup.acquire(model, starter) as backend:
                results[model].append(backend.address)
        except ValueError as exc:
            results[model].append(str(exc))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller, "bad")
            tg.start_soon(caller, "good")
        await anyio.wait_all_tasks_blocked()
        starter.gate.set()
    assert results["bad"] == ["bad weights"] * 5
    assert results["good"] == ["127.0.0.1:good-1"] * 5
    assert [r.model for r in sup.snapshot()] == ["good"]


async def test_each_waiter_of_a_failed_start_gets_a_traceback_of_its_own(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup()
    starter = Starter()
    starter.gate = anyio.Event()
    starter.errors["m"] = RuntimeError("boom")
    lengths: list[int] = []

    async def caller() -> None:
        try:
            async with sup.acquire("m", starter):
                pass
        except RuntimeError as exc:
            lengths.append(len(traceback.extract_tb(exc.__traceback__)))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        starter.gate.set()
    assert len(lengths) == 10
    assert len(set(lengths)) == 1, lengths


@pytest.mark.parametrize(
    "returned",
    [42, ("127.0.0.1:1",), (None, None), ("", None)],
    ids=["int", "1-tuple", "no-address", "empty-address"],
)
async def test_a_start_returning_nonsense_fails_its_callers(
    open_sup: Callable[..., Any], returned: object
) -> None:
    sup: Supervisor = await open_sup(max_loaded=1, eviction_timeout=0)

    async def bad_start(model: str) -> Any:
        return returned

    with pytest.raises(ConfigError):
        async with sup.acquire("m", bad_start):
            pass
    assert sup.loaded_count == 0
    async with sup.acquire("m", Starter()):  # nothing reserved is left behind
        pass


@virtual_time
async def test_a_hung_start_is_bounded_by_start_timeout() -> None:
    recorder = Recorder()
    async with Supervisor(shutdown=recorder, start_timeout=5, max_loaded=1) as sup:
        starter = Starter()
        starter.hang = True
        got: list[BaseException] = []

        async def caller() -> None:
            try:
                async with sup.acquire("m", starter):
                    pytest.fail("entered a backend whose start hung")
            except TimeoutError as exc:
                got.append(exc)

        began = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(caller)
        assert anyio.current_time() - began == pytest.approx(5, abs=0.1)
        assert len(got) == 5
        assert starter.starts["m"] == 1
        assert starter.cancelled == 1  # the start itself was cancelled, not left running
        assert sup.loaded_count == 0
        starter.hang = False
        async with sup.acquire("m", starter) as backend:  # a later acquire tries again
            assert_in_use(sup, backend.address)
        assert starter.starts["m"] == 2


@virtual_time
async def test_a_hung_call_on_a_loaded_backend_is_stopped_after_busy_timeout() -> None:
    """The caller that loaded a backend is busy from the registration on: the busy timer runs
    (a deadline loop asleep with nothing to wait for is woken by the new busy deadline)."""
    recorder = Recorder()
    async with Supervisor(shutdown=recorder, busy_timeout=3) as sup:
        began = anyio.current_time()
        with pytest.raises(BackendStoppedError) as caught:
            async with sup.acquire("m", Starter()):
                await anyio.sleep_forever()
        assert caught.value.reason is EvictionReason.BUSY_TIMEOUT
        assert anyio.current_time() - began == pytest.approx(3, abs=0.1)
        await settle(sup)  # the caller is failed first; the stop itself follows
        assert recorder.stopped == ["127.0.0.1:m-1"]
        assert sup.loaded_count == 0


@virtual_time
async def test_a_caller_is_seen_in_flight_at_every_checkpoint() -> None:
    """On a virtual clock, time stands still while tasks are runnable: a consumer that lets
    messages gather for a moment holds them indefinitely. Decisions must see the call anyway:
    make_room cannot pick the backend its own caller is inside."""
    async with Supervisor(max_loaded=1) as sup:
        async with sup.acquire("m", Starter()) as backend:
            await anyio.wait_all_tasks_blocked()
            assert_in_use(sup, backend.address)
            with pytest.raises(CapacityError):
                await sup.make_room(timeout=0)
            assert_in_use(sup, backend.address)
        async with sup.busy(backend.address):
            await anyio.wait_all_tasks_blocked()
            assert_in_use(sup, backend.address)


async def test_a_duplicate_address_fails_the_load_and_stops_its_process(
    recorder: Recorder,
) -> None:
    """start returned an address already registered: the waiters get DuplicateBackendError and
    the process it started is not left running."""
    procs: list[subprocess.Popen[str]] = []

    async def start_duplicate(model: str) -> tuple[str, subprocess.Popen[str]]:
        proc = start(sleeper_argv())
        procs.append(proc)
        assert await read_line(proc) == "ready"
        return "127.0.0.1:1", proc

    try:
        async with Supervisor(shutdown=recorder, stop_timeout=1) as sup:
            sup.register("127.0.0.1:1", "other")
            with pytest.raises(DuplicateBackendError):
                async with sup.acquire("m", start_duplicate):
                    pass
            assert [r.model for r in sup.snapshot()] == ["other"]
            assert is_gone(procs[0].pid)
    finally:
        reap(procs)


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelling_a_waiter_leaves_no_trace(open_sup: Callable[..., Any]) -> None:
    sup: Supervisor = await open_sup()
    starter = Starter()
    starter.gate = anyio.Event()
    release = anyio.Event()
    entered: list[str] = []

    async def caller(scope_out: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_out.append(scope)
            async with sup.acquire("m", starter) as backend:
                entered.append(backend.address)
                await release.wait()

    scopes: list[anyio.CancelScope] = []
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(caller, scopes)
        await anyio.wait_all_tasks_blocked()
        scopes[0].cancel()
        await anyio.wait_all_tasks_blocked()
        starter.gate.set()
        await anyio.wait_all_tasks_blocked()
        (address,) = set(entered)
        assert len(entered) == 2
        assert status(sup, address) == (False, 2)
        release.set()
    await settle(sup)
    assert status(sup, address) == (False, 0)
    assert starter.starts["m"] == 1


async def test_cancelling_every_waiter_lets_the_load_finish_idle(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup()
    starter = Starter()
    starter.gate = anyio.Event()
    with anyio.move_on_after(0) as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(_use, sup, "m", starter)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert starter.starts["m"] == 1
    starter.gate.set()
    await settle(sup)
    assert [(r.model, r.inflight) for r in sup.snapshot()] == [("m", 0)]
    async with sup.acquire("m", starter) as backend:  # the finished load is used, not redone
        assert_in_use(sup, backend.address)
    assert starter.starts["m"] == 1


async def test_a_waiter_cancelled_as_the_load_completes_is_not_left_in_flight(
    open_sup: Callable[..., Any], clock: ManualClock
) -> None:
    """The load marks the waiter busy and the waiter is cancelled before it resumes: its mark is
    taken back, so the backend goes idle (and can be unloaded)."""
    sup: Supervisor = await open_sup(idle_timeout=10)
    starter = Starter()
    scopes: list[anyio.CancelScope] = []
    starter.on_return = lambda model: scopes[0].cancel()
    evictions: list[Eviction] = []

    async def caller() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            async with sup.acquire("m", starter):
                pytest.fail("a cancelled caller entered")

    async with anyio.create_task_group() as events_tg:
        events_tg.start_soon(collect, sup, evictions, lambda: None)
        await caller()
        await settle(sup)
        assert [(r.model, r.inflight, r.busy_for) for r in sup.snapshot()] == [("m", 0, None)]
        clock.advance(10)
        await settle(sup)
        events_tg.cancel_scope.cancel()
    assert [e.reason for e in evictions] == [EvictionReason.IDLE_TIMEOUT]


async def _use(sup: Supervisor, model: str, starter: Starter) -> None:
    async with sup.acquire(model, starter):
        pass


# -- with the concurrency limit ---------------------------------------------------------------


async def test_a_caller_waiting_for_a_slot_is_not_handed_a_backend_being_evicted(
    open_sup: Callable[..., Any],
) -> None:
    """max_concurrency=1: a caller waits for the slot; meanwhile evict() drains the backend
    (it takes no new calls). When the slot frees, the waiter must not enter the draining
    backend: acquire loads a fresh one for it instead."""
    sup: Supervisor = await open_sup(max_concurrency=1)
    starter = Starter()
    first_inside = anyio.Event()
    release_first = anyio.Event()
    second_saw: list[tuple[str, bool]] = []

    async def first() -> None:
        async with sup.acquire("m", starter):
            first_inside.set()
            await release_first.wait()

    async def second() -> None:
        async with sup.acquire("m", starter) as backend:
            stopping, _ = status(sup, backend.address)
            second_saw.append((backend.address, stopping))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_inside.wait()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert sup.snapshot()[0].waiting == 1
        tg.start_soon(sup.evict, "127.0.0.1:m-1")
        await anyio.wait_all_tasks_blocked()
        assert sup.snapshot()[0].stopping  # draining: no new calls
        release_first.set()
    assert second_saw == [("127.0.0.1:m-2", False)]


async def test_waiters_beyond_the_limit_get_in_when_a_slot_frees(
    open_sup: Callable[..., Any],
) -> None:
    sup: Supervisor = await open_sup(max_concurrency=2)
    starter = Starter()
    starter.gate = anyio.Event()
    release = anyio.Event()
    inside: list[int] = []
    peak = 0

    async def caller() -> None:
        nonlocal peak
        async with sup.acquire("m", starter) as backend:
            inside.append(1)
            _, inflight = status(sup, backend.address)
            peak = max(peak, inflight)
            await release.wait()
            inside.pop()

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        starter.gate.set()
        await anyio.wait_all_tasks_blocked()
        assert len(inside) == 2
        assert sup.snapshot()[0].waiting == 4
        release.set()
    assert peak == 2
    assert starter.starts["m"] == 1


# -- real processes ---------------------------------------------------------------------------


def reap(procs: list[subprocess.Popen[str]]) -> None:
    """Collect the children's exit status (the supervisor never reaps) and close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_real_processes_started_once_and_stopped_when_evicted(recorder: Recorder) -> None:
    procs: list[subprocess.Popen[str]] = []
    starts: Counter[str] = Counter()

    async def start_process(model: str) -> tuple[str, subprocess.Popen[str]]:
        starts[model] += 1
        proc = start(sleeper_argv())
        procs.append(proc)
        assert await read_line(proc) == "ready"
        return f"127.0.0.1:{40000 + len(procs)}", proc

    pids: dict[str, set[int | None]] = defaultdict(set)

    async def caller(model: str) -> None:
        async with sup.acquire(model, start_process) as backend:
            pids[model].add(backend.pid)
            await anyio.lowlevel.checkpoint()
            assert_in_use(sup, backend.address)

    try:
        async with Supervisor(shutdown=recorder, max_loaded=1, stop_timeout=1) as sup:
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(caller, "a")
            assert starts == {"a": 1}
            assert pids["a"] == {procs[0].pid}
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(caller, "b")
            assert starts == {"a": 1, "b": 1}
            assert pids["b"] == {procs[1].pid}
            # b's load evicted a (LRU): callback, then SIGTERM; the process is gone
            assert recorder.stopped == ["127.0.0.1:40001"]
            assert is_gone(procs[0].pid)
            assert not is_gone(procs[1].pid)
        assert recorder.stopped == ["127.0.0.1:40001", "127.0.0.1:40002"]
        assert is_gone(procs[1].pid)
    finally:
        reap(procs)
