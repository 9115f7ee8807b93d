"""The pure core against a reference model: random sequences of register / enter / exit /
progress / touch / forget / advance-time / check (due) / make_room and memory decisions / stop
outcomes / configure, applied both to the registry + policy functions (driven exactly as the
supervisor drives them) and to a small model written here from the rules in DESIGN.md, with
plain dicts, linear scans and every deadline recomputed from scratch. They must agree on every
decision: who is due and why at each time, the LRU order, LRU and memory victim lists, the
room needed; and the supervisor's next wake-up must never be later than the earliest deadline.

The rules the model encodes (DESIGN.md, "Rules"):

- busy = at least one call in flight; the busy timer runs from the last progress (an enter or
  ``progress()``), and applies to pinned backends too;
- idle time runs from the moment the count reached 0, or from registration; a backend's own
  ``idle_timeout`` wins over the global one (None: never); pinned and stopping backends are
  never idle-evicted; a stop that fails leaves the backend tracked, idle from that moment;
- LRU order: the last enter, exit or touch; registration counts as a use;
- LRU victims: least recently used first, idle before busy, busy only with force, pinned and
  stopping never; memory victims: idle before busy, most bytes held first, then LRU order.

A call that enters and ends before the supervisor applies its mark travels as one message
(``CallState.ENDED_QUEUED``); the model treats it as an enter and an exit. The machine makes
such calls on idle backends only; whether one counts as progress for a busy backend's other
calls is pinned by ``test_a_call_that_ended_before_its_mark_was_applied_counts_as_progress``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from watchdog_async import INHERIT, DuplicateBackendError, EvictionReason, Settings
from watchdog_async import _policy as policy
from watchdog_async._registry import Call, CallState, Record, Registry

ADDRESSES = ("a", "b", "c", "d", "e")
DT = st.sampled_from((0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0))  # exact binary fractions
TIMEOUTS = st.sampled_from((None, 1.0, 2.5, 5.0))
OVERRIDES = st.sampled_from((INHERIT, INHERIT, None, 1.0, 4.0))
ADDRESS = st.sampled_from(ADDRESSES)
BUSY_TIMEOUT, IDLE_TIMEOUT = EvictionReason.BUSY_TIMEOUT, EvictionReason.IDLE_TIMEOUT


# -- the reference model ---------------------------------------------------------------------


@dataclass(eq=False)
class Model:
    """One registration of an address, as the rules describe it."""

    address: str
    pinned: bool
    idle_timeout: object  # INHERIT, None or seconds
    calls: set[int] = field(default_factory=set)
    last_progress: float = 0.0
    idle_since: float = 0.0
    last_use: int = 0  # sequence number of the last use
    stopping: EvictionReason | None = None


@dataclass
class Reference:
    now: float = 1000.0
    busy_timeout: float | None = None
    idle_timeout: float | None = None
    max_loaded: int = 0
    tracked: dict[str, Model] = field(default_factory=dict)
    uses: int = 0

    def use(self, model: Model) -> None:
        self.uses += 1
        model.last_use = self.uses

    def lru(self) -> list[Model]:
        return sorted(self.tracked.values(), key=lambda m: m.last_use)

    def busy_deadline(self, model: Model) -> float | None:
        if not model.calls or self.busy_timeout is None:
            return None
        return model.last_progress + self.busy_timeout

    def idle_deadline(self, model: Model) -> float | None:
        if model.calls or model.pinned or model.stopping is not None:
            return None
        timeout = self.idle_timeout if model.idle_timeout is INHERIT else model.idle_timeout
        if timeout is None:
            return None
        assert isinstance(timeout, float)
        return model.idle_since + timeout

    def due(self) -> list[tuple[str, EvictionReason]]:
        found = []
        for model in self.tracked.values():
            if model.stopping is not None:
                continue
            busy, idle = self.busy_deadline(model), self.idle_deadline(model)
            if busy is not None and busy <= self.now:
                found.append((model.address, BUSY_TIMEOUT))
            if idle is not None and idle <= self.now:
                found.append((model.address, IDLE_TIMEOUT))
        return sorted(found)

    def earliest_deadline(self) -> float | None:
        deadlines = [
            d
            for m in self.tracked.values()
            if m.stopping is None
            for d in (self.busy_deadline(m), self.idle_deadline(m))
            if d is not None
        ]
        return min(deadlines, default=None)

    def room_needed(self, pending: int) -> int:
        if self.max_loaded == 0:
            return 0
        return max(0, len(self.tracked) + pending + 1 - self.max_loaded)

    def candidates(self, exclude: set[str]) -> list[Model]:
        return [
            m
            for m in self.lru()
            if not m.pinned and m.stopping is None and m.address not in exclude
        ]

    def lru_victims(self, count: int, force: bool, exclude: set[str]) -> list[str]:
        candidates = self.candidates(exclude)
        idle = [m.address for m in candidates if not m.calls]
        busy = [m.address for m in candidates if m.calls] if force else []
        return (idle + busy)[: max(0, count)]

    def memory_victims(self, held: dict[str, int], force: bool, exclude: set[str]) -> list[str]:
        candidates = [m for m in self.candidates(exclude) if force or not m.calls]
        idle = [m for m in candidates if not m.calls]
        busy = [m for m in candidates if m.calls]
        order: list[str] = []
        for group in (idle, busy):
            holders = sorted({held.get(m.address, 0) for m in group}, reverse=True)
            for amount in holders:  # most bytes first; LRU order within equal amounts
                order += [m.address for m in group if held.get(m.address, 0) == amount]
        return order


# -- the machine -----------------------------------------------------------------------------


@dataclass(eq=False)
class Live:
    """One call in flight: the core's Call and the model's view of it."""

    call: Call
    model: Model
    number: int


class CoreAgainstReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.registry = Registry()
        self.settings = Settings()
        self.ref = Reference()
        self.records: dict[str, Record] = {}
        self.calls: list[Live] = []
        self.stopping: list[str] = []
        self.numbers = 0

    # the supervisor's ways of feeding the core

    def apply(self, call: Call) -> None:
        """What Supervisor._drain does with one message."""
        if self.registry.apply(call) and call.record.registered:
            policy.schedule(self.registry, call.record, self.settings)

    def begin_stop(self, address: str, reason: EvictionReason) -> None:
        """What Supervisor._begin_stop does to the state (the stop itself is async)."""
        record, model = self.records[address], self.ref.tracked[address]
        assert record.stopping is None and model.stopping is None
        record.stopping = model.stopping = reason
        self.stopping.append(address)

    @initialize(busy=TIMEOUTS, idle=TIMEOUTS, max_loaded=st.integers(0, 4))
    def start(self, busy: float | None, idle: float | None, max_loaded: int) -> None:
        self.settings = Settings(busy_timeout=busy, idle_timeout=idle, max_loaded=max_loaded)
        self.ref.busy_timeout, self.ref.idle_timeout = busy, idle
        self.ref.max_loaded = max_loaded

    # -- rules -----------------------------------------------------------------------------

    @rule(address=ADDRESS, pinned=st.booleans(), idle_timeout=OVERRIDES)
    def register(self, address: str, pinned: bool, idle_timeout: object) -> None:
        record = Record(
            address=address,
            model=f"model-{address}",
            now=self.ref.now,
            process=None,
            pinned=pinned,
            idle_timeout=idle_timeout,  # type: ignore[arg-type]
            size=None,
            max_concurrency=INHERIT,
        )
        if address in self.ref.tracked:
            with pytest.raises(DuplicateBackendError):
                self.registry.add(record)
            return
        self.registry.add(record)
        policy.schedule(self.registry, record, self.settings)
        self.records[address] = record
        model = Model(address, pinned, idle_timeout, last_progress=self.ref.now)
        model.idle_since = self.ref.now
        self.ref.tracked[address] = model
        self.ref.use(model)

    def _enterable(self, address: str) -> bool:
        model = self.ref.tracked.get(address)
        return model is not None and model.stopping is None  # else busy() refuses the call

    @rule(address=ADDRESS)
    def enter(self, address: str) -> None:
        if not self._enterable(address):
            return
        call = Call(self.records[address], self.ref.now)
        self.apply(call)
        model = self.ref.tracked[address]
        self.numbers += 1
        model.calls.add(self.numbers)
        model.last_progress = max(model.last_progress, self.ref.now)
        self.ref.use(model)
        self.calls.append(Live(call, model, self.numbers))

    @precondition(lambda self: self.calls)
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        live = self.calls.pop(data.draw(st.integers(0, len(self.calls) - 1), label="call"))
        live.call.exited_at = self.ref.now
        live.call.state = CallState.EXIT_QUEUED
        self.apply(live.call)
        model = live.model
        model.calls.discard(live.number)
        if self.ref.tracked.get(model.address) is model:
            self.ref.use(model)
            if not model.calls:
                model.idle_since = self.ref.now

    @rule(address=ADDRESS, duration=DT)
    def quick_call(self, address: str, duration: float) -> None:
        """A call that enters and ends before the supervisor applies its mark: one message.
        On an idle backend only: on a busy one, see the test at the end of this file."""
        if not self._enterable(address) or self.ref.tracked[address].calls:
            return
        call = Call(self.records[address], self.ref.now)
        self.ref.now += duration
        call.exited_at = self.ref.now
        call.state = CallState.ENDED_QUEUED
        self.apply(call)
        model = self.ref.tracked[address]
        self.ref.use(model)  # the enter...
        self.ref.use(model)  # ...and the exit
        if not model.calls:
            model.idle_since = self.ref.now

    @precondition(lambda self: self.calls)
    @rule(data=st.data())
    def progress(self, data: st.DataObject) -> None:
        live = self.calls[data.draw(st.integers(0, len(self.calls) - 1), label="call")]
        record = live.call.record
        if self.ref.now > record.last_progress:  # what BusyHandle.progress() does
            record.last_progress = self.ref.now
        live.model.last_progress = max(live.model.last_progress, self.ref.now)

    @rule(address=ADDRESS)
    def touch(self, address: str) -> None:
        if address not in self.ref.tracked:
            return
        self.registry.touch(self.records[address], self.ref.now)
        self.ref.use(self.ref.tracked[address])

    @rule(address=ADDRESS)
    def forget(self, address: str) -> None:
        if address not in self.ref.tracked:
            return
        self.registry.remove(self.records.pop(address))
        del self.ref.tracked[address]
        if address in self.stopping:
            self.stopping.remove(address)

    @rule(dt=DT)
    def advance(self, dt: float) -> None:
        self.ref.now += dt

    @rule()
    def check(self) -> None:
        """The deadline loop: who is due, and why; each due backend starts stopping."""
        due = policy.due(self.registry, self.ref.now, self.settings)
        core = sorted((r.address, reason) for r, reason in due if r.stopping is None)
        assert core == self.ref.due()
        for address, reason in core:
            self.begin_stop(address, reason)

    @precondition(lambda self: self.stopping)
    @rule(data=st.data(), ok=st.booleans())
    def finish_stop(self, data: st.DataObject, ok: bool) -> None:
        """What Supervisor._run_stop does when a stop ends (ok: untracked; else retried)."""
        address = self.stopping.pop(data.draw(st.integers(0, len(self.stopping) - 1)))
        record, model = self.records[address], self.ref.tracked[address]
        if ok:
            self.registry.remove(record)
            del self.records[address], self.ref.tracked[address]
            return
        record.stopping = model.stopping = None
        record.idle_since = max(record.idle_since, self.ref.now)
        policy.schedule(self.registry, record, self.settings)
        model.idle_since = max(model.idle_since, self.ref.now)

    @rule(
        count=st.integers(-1, 6),
        pending=st.integers(0, 3),
        force=st.booleans(),
        exclude=st.sets(ADDRESS, max_size=2),
        begin=st.booleans(),
    )
    def make_room(
        self, count: int, pending: int, force: bool, exclude: set[str], begin: bool
    ) -> None:
        need = policy.room_needed(len(self.registry), pending, self.settings.max_loaded)
        assert need == self.ref.room_needed(pending)
        excluded = {self.records[a] for a in exclude if a in self.records}
        for wanted in (count, need):
            victims = policy.lru_victims(self.registry, wanted, force=force, exclude=excluded)
            assert [r.address for r in victims] == self.ref.lru_victims(wanted, force, exclude)
        if begin:
            for record in policy.lru_victims(self.registry, need, force=force, exclude=excluded):
                self.begin_stop(record.address, EvictionReason.LRU)

    @rule(
        held=st.dictionaries(ADDRESS, st.sampled_from((0, 1, 2, 5)), max_size=5),
        force=st.booleans(),
        exclude=st.sets(ADDRESS, max_size=2),
        begin=st.booleans(),
    )
    def memory(self, held: dict[str, int], force: bool, exclude: set[str], begin: bool) -> None:
        excluded = {self.records[a] for a in exclude if a in self.records}
        victims = policy.memory_victims(self.registry, held, force=force, exclude=excluded)
        assert [r.address for r in victims] == self.ref.memory_victims(held, force, exclude)
        if begin and victims:
            self.begin_stop(victims[0].address, EvictionReason.MEMORY)

    @rule(address=ADDRESS, force=st.booleans())
    def evict(self, address: str, force: bool) -> None:
        """evict(): forced, or unforced on a backend with no call in flight."""
        model = self.ref.tracked.get(address)
        if model is None or model.stopping is not None or (model.calls and not force):
            return
        self.begin_stop(address, EvictionReason.MANUAL)

    @rule(busy=TIMEOUTS, idle=TIMEOUTS, max_loaded=st.integers(0, 4))
    def configure(self, busy: float | None, idle: float | None, max_loaded: int) -> None:
        """What Supervisor.configure does with the new settings."""
        old = self.settings
        self.settings = old.replace(busy_timeout=busy, idle_timeout=idle, max_loaded=max_loaded)
        if (old.busy_timeout, old.idle_timeout) != (busy, idle):
            policy.reschedule_all(self.registry, self.settings)
        self.ref.busy_timeout, self.ref.idle_timeout = busy, idle
        self.ref.max_loaded = max_loaded

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def same_backends_in_the_same_lru_order(self) -> None:
        assert [r.address for r in self.registry] == [m.address for m in self.ref.lru()]
        for record in self.registry:
            model = self.ref.tracked[record.address]
            assert record.inflight == len(model.calls) >= 0
            assert record.stopping is model.stopping

    @invariant()
    def the_next_wake_up_is_never_late(self) -> None:
        earliest = self.ref.earliest_deadline()
        planned = policy.next_deadline(self.registry)
        if earliest is not None:
            assert planned is not None and planned <= earliest, (planned, earliest)


CoreAgainstReference.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreAgainstReference = CoreAgainstReference.TestCase


def test_a_call_that_ended_before_its_mark_was_applied_counts_as_progress() -> None:
    """'The busy timer runs from the last progress (enter or progress())': a short call that
    entered while a long one is in flight is an enter, whether its mark was applied before it
    ended or together with its exit."""
    settings_ = Settings(busy_timeout=10)
    registry = Registry()
    record = Record(
        address="a",
        model="m",
        now=0.0,
        process=None,
        pinned=False,
        idle_timeout=INHERIT,
        size=None,
        max_concurrency=INHERIT,
    )
    registry.add(record)
    long_call = Call(record, 0.0)
    registry.apply(long_call)
    policy.schedule(registry, record, settings_)
    short = Call(record, 8.0)  # enters at 8 and ends at 8.5, applied as one message
    short.exited_at = 8.5
    short.state = CallState.ENDED_QUEUED
    registry.apply(short)
    assert policy.due(registry, 10.0, settings_) == []
    assert math.isclose(record.last_progress, 8.0)
