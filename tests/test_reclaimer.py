"""The memory reclaimer through the Supervisor (issue 4): threshold, hysteresis, per-device and
per-process attribution, recovery waits, broken probes, fit before load.

Memory is scripted (:class:`ScriptedProbe`) and modelled so that it falls when a backend stops:
:class:`Memory` releases what a backend holds when its shutdown callback runs (at once, some
reads later, or never); :class:`ProcessMemory` lists real child processes per device, as NVML
does, and counts only those still alive. Checks are run with ``await sup.check()``; the periodic
check is pushed out of the way (``check_interval=QUIET``) except where it is under test. Real
waits are the reclaimer's own recovery polls (about 250 ms each), kept few.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import anyio
import anyio.to_thread
import psutil
import pytest
from _children import is_gone, parent_with_grandchild_argv, read_line, sleeper_argv, start

from watchdog_async import (
    Backend,
    BackendStoppedError,
    CapacityError,
    DeviceMemory,
    Eviction,
    EvictionReason,
    MemoryProbe,
    MemoryReading,
    Supervisor,
)
from watchdog_async._memory import DeviceKind
from watchdog_async.testing import ScriptedProbe, gib

QUIET = 3600.0  # check_interval where the periodic check must not interfere
MEMORY = EvictionReason.MEMORY


def evicted(evictions: Iterable[Eviction]) -> list[str]:
    """Addresses of evictions, checking each was a successful memory eviction."""
    result = []
    for eviction in evictions:
        assert (eviction.reason, eviction.ok) == (MEMORY, True), eviction
        result.append(eviction.address)
    return result


def loaded(sup: Supervisor) -> list[str]:
    return [status.address for status in sup.snapshot()]


class Memory:
    """Scripted devices: each one's used figure is a base plus what loaded backends hold on it.

    ``shutdown`` is the supervisor's shutdown callback: it releases the stopped backend's share
    at once, or only ``release_after`` reads later, or never (``never_release``); it raises for
    addresses in ``failing`` (their memory stays) and waits for ``gate`` when one is set;
    ``stop_started`` is set when the first stop begins. Every read and every stop is appended
    to ``log`` ("read 91", "read 95/80", "stop a"). Reads come from a worker thread, hence the
    lock. Make it inside the test (its event belongs to the test's event loop).
    """

    def __init__(self, *bases: float, total: float = 100, kind: DeviceKind = "gpu") -> None:
        self.bases = list(bases or (0,))
        self.total = total
        self.kind: DeviceKind = kind
        self.held: dict[str, dict[int, float]] = {}  # address -> device index -> GiB
        self.releasing: dict[str, int] = {}  # stopped address -> reads before it shows as free
        self.release_after = 0
        self.never_release = False
        self.failing: set[str] = set()
        self.gate: anyio.Event | None = None
        self.stop_started = anyio.Event()
        self.log: list[str] = []
        self.read_times: list[float] = []
        self.stop_times: list[float] = []
        self._lock = threading.Lock()

    def hold(self, address: str, amount: float, device: int = 0) -> None:
        with self._lock:
            self.held.setdefault(address, {})[device] = amount

    def used(self, device: int) -> float:
        return self.bases[device] + sum(d.get(device, 0) for d in self.held.values())

    def read(self) -> MemoryReading:
        with self._lock:
            for address, left in list(self.releasing.items()):
                if left == 0:
                    del self.releasing[address]
                    self.held.pop(address, None)
                else:
                    self.releasing[address] = left - 1
            used = [self.used(i) for i in range(len(self.bases))]
            self.log.append("read " + "/".join(f"{u:g}" for u in used))
            self.read_times.append(time.monotonic())
        return MemoryReading(
            tuple(
                DeviceMemory(i, f"device {i}", gib(self.total), gib(u), self.kind)
                for i, u in enumerate(used)
            )
        )

    def probe(self) -> ScriptedProbe:
        return ScriptedProbe(self.read)

    async def shutdown(self, backend: Backend) -> None:
        address = backend.address
        with self._lock:
            self.log.append(f"stop {address}")
            self.stop_times.append(time.monotonic())
        self.stop_started.set()
        if self.gate is not None:
            await self.gate.wait()
        if address in self.failing:
            raise RuntimeError(f"{address} refused to unload")
        with self._lock:
            if self.never_release:
                return
            if self.release_after:
                self.releasing[address] = self.release_after
            else:
                self.held.pop(address, None)


@contextlib.asynccontextmanager
async def reclaimer(
    memory: Memory | None = None, *, probe: MemoryProbe | None = None, **settings: Any
) -> AsyncIterator[Supervisor]:
    settings.setdefault("check_interval", QUIET)
    settings.setdefault("memory_recovery_timeout", 0.3)
    settings.setdefault("stop_timeout", 2)
    if probe is None:
        assert memory is not None
        probe = memory.probe()
    shutdown = None if memory is None else memory.shutdown
    async with Supervisor(shutdown=shutdown, memory_probe=probe, **settings) as sup:
        yield sup


# -- threshold and target ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [(50, []), (65, []), (66, ["a"])],
    ids=["under", "at-threshold", "over"],
)
async def test_only_a_device_over_the_threshold_triggers(base: float, expected: list[str]) -> None:
    memory = Memory(base)
    memory.hold("a", 10)
    async with reclaimer(memory, memory_threshold=0.75, memory_target=0.5) as sup:
        sup.register("a", "m")
        assert evicted(await sup.check()) == expected
        assert sup.loaded_count == 1 - len(expected)


async def test_evicts_one_at_a_time_down_to_the_target_then_holds() -> None:
    memory = Memory(31)
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.5) as sup:
        for address in "abcd":
            sup.register(address, f"model-{address}")
            memory.hold(address, 15)
        assert evicted(await sup.check()) == ["a", "b", "c"]
        # one stop at a time, each decided on a reading taken after the previous stop
        assert memory.log == [
            "read 91",
            "stop a",
            "read 76",
            "stop b",
            "read 61",
            "stop c",
            "read 46",
        ]
        assert loaded(sup) == ["d"]
        # hysteresis: between the target and the threshold, nothing happens
        sup.register("e", "model-e")
        memory.hold("e", 40)
        memory.log.clear()
        assert await sup.check() == []
        assert memory.log == ["read 86"]
        assert loaded(sup) == ["d", "e"]


async def test_each_device_is_judged_on_its_own_not_summed() -> None:
    # 40% and 95% average to 67.5%: a reclaimer summing devices would see nothing to do
    memory = Memory(40, 60)
    memory.hold("a", 35, device=1)
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.8) as sup:
        sup.register("a", "m")
        assert evicted(await sup.check()) == ["a"]
        assert memory.log == ["read 40/95", "stop a", "read 40/60"]


async def test_two_devices_each_under_the_threshold_trigger_nothing() -> None:
    memory = Memory(75, 75)
    memory.hold("a", 10, device=0)
    memory.hold("a", 10, device=1)
    async with reclaimer(memory, memory_threshold=0.9) as sup:
        sup.register("a", "m")
        assert await sup.check() == []


async def test_a_later_device_is_judged_on_a_fresh_reading() -> None:
    # "a" spans both GPUs (tensor parallel): evicting it for GPU 0 brings GPU 1 down too
    memory = Memory(75, 65)
    memory.hold("a", 20, device=0)
    memory.hold("a", 20, device=1)
    memory.hold("b", 10, device=1)
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.8) as sup:
        sup.register("a", "m")
        sup.register("b", "m2")
        assert memory.used(0) == memory.used(1) == 95
        assert evicted(await sup.check()) == ["a"]
        assert loaded(sup) == ["b"]


# -- who is evicted ----------------------------------------------------------------------------


async def test_busy_and_pinned_backends_are_skipped() -> None:
    memory = Memory(65)
    release = anyio.Event()
    entered = anyio.Event()
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.6) as sup:
        for address in ("busy", "pinned", "idle"):
            sup.register(address, f"model-{address}", pinned=address == "pinned")
            memory.hold(address, 10)

        async def caller() -> None:
            async with sup.busy("busy"):
                entered.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await entered.wait()
            assert evicted(await sup.check()) == ["idle"]  # then nothing else is evictable
            assert sorted(loaded(sup)) == ["busy", "pinned"]  # a use moved "busy" last
            release.set()  # the caller was never disturbed


async def test_force_eviction_when_busy_evicts_busy_ones_after_idle_ones() -> None:
    memory = Memory(65)
    caught: list[BackendStoppedError] = []
    entered = anyio.Event()
    async with reclaimer(
        memory, memory_threshold=0.9, memory_target=0.6, force_eviction_when_busy=True
    ) as sup:
        for address in ("busy", "pinned", "idle"):
            sup.register(address, f"model-{address}", pinned=address == "pinned")
            memory.hold(address, 10)

        async def caller() -> None:
            try:
                async with sup.busy("busy"):
                    entered.set()
                    await anyio.sleep_forever()
            except BackendStoppedError as exc:
                caught.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await entered.wait()
                assert evicted(await sup.check()) == ["idle", "busy"]
        assert [(e.address, e.reason) for e in caught] == [("busy", MEMORY)]
        assert loaded(sup) == ["pinned"]


async def test_a_backend_that_fails_to_stop_stays_and_the_next_is_tried() -> None:
    memory = Memory(70)
    memory.failing.add("a")
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.8) as sup:
        for address in "ab":
            sup.register(address, f"model-{address}")
            memory.hold(address, 12)
        first, second = await sup.check()
        assert (first.address, first.ok, type(first.error)) == ("a", False, RuntimeError)
        assert (second.address, second.ok) == ("b", True)
        assert loaded(sup) == ["a"]  # still tracked and counted
        assert sup.faults == {"stop: RuntimeError": 1}


@pytest.mark.parametrize("kind", ["unified", "ram", "gpu"])
async def test_without_per_process_figures_declared_sizes_go_first(kind: DeviceKind) -> None:
    memory = Memory(80, kind=kind)  # no process list: as on unified-memory and RAM-only machines
    async with reclaimer(memory, memory_threshold=0.9, memory_target=0.8) as sup:
        sup.register("a", "model-a", size=gib(2))
        sup.register("b", "model-b", size=gib(8))
        sup.register("c", "model-c")  # size unknown: least recently used order among these
        for address, amount in (("a", 2), ("b", 8), ("c", 4)):
            memory.hold(address, amount)
        assert memory.used(0) == 94
        assert evicted(await sup.check()) == ["b", "a", "c"]  # LRU alone would be a, b, c


# -- per-process attribution with real processes ------------------------------------------------


class Children:
    """The test's child processes, killed (if still there) and reaped at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[str]] = []
        self.tracked: list[psutil.Process] = []

    async def sleeper(self) -> subprocess.Popen[str]:
        proc = start(sleeper_argv())
        self.popens.append(proc)
        assert await read_line(proc) == "ready"
        return proc

    async def parent_with_grandchild(self) -> tuple[subprocess.Popen[str], int]:
        proc = start(parent_with_grandchild_argv())
        self.popens.append(proc)
        _, grandchild = map(int, (await read_line(proc)).split())
        with contextlib.suppress(psutil.NoSuchProcess):
            self.tracked.append(psutil.Process(grandchild))
        return proc, grandchild

    def close(self) -> None:
        for ps_proc in self.tracked:
            with contextlib.suppress(psutil.NoSuchProcess):
                ps_proc.kill()
        for proc in self.popens:
            proc.kill()  # a no-op once its status was collected
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    owned = Children()
    yield owned
    owned.close()


class ProcessMemory:
    """GPUs listing the processes that hold memory on them, as NVML does: used = base + what
    live listed processes hold; a process that has exited (or is a zombie) holds nothing."""

    def __init__(self, *bases: float, total: float = 100) -> None:
        self.bases = bases
        self.total = total
        self.holders: list[dict[int, float]] = [{} for _ in bases]  # per device: pid -> GiB

    def read(self) -> MemoryReading:
        devices = []
        for index, (base, holders) in enumerate(zip(self.bases, self.holders, strict=True)):
            live = {pid: gib(amount) for pid, amount in holders.items() if not is_gone(pid)}
            used = gib(base) + sum(live.values())
            devices.append(DeviceMemory(index, f"gpu {index}", gib(self.total), used, "gpu", live))
        return MemoryReading(tuple(devices))


async def test_backends_holding_memory_go_first_most_bytes_first(children: Children) -> None:
    memory = ProcessMemory(60)
    c, a, b = [await children.sleeper() for _ in range(3)]
    memory.holders[0].update({a.pid: 10, b.pid: 20})  # c, the oldest, holds nothing here
    async with reclaimer(
        probe=ScriptedProbe(memory.read),
        memory_threshold=0.85,
        memory_target=0.65,
    ) as sup:
        for address, proc in (("c", c), ("a", a), ("b", b)):
            sup.register(address, f"model-{address}", process=proc)
        assert evicted(await sup.check()) == ["b", "a"]
        assert is_gone(a.pid)
        assert is_gone(b.pid)
        assert loaded(sup) == ["c"]


async def test_attribution_is_per_device(children: Children) -> None:
    memory = ProcessMemory(50, 80)  # GPU 0 ends at 80% (under), GPU 1 at 90% (over)
    c, a, b = [await children.sleeper() for _ in range(3)]
    memory.holders[0][a.pid] = 30  # the most bytes overall, but on the device that is fine
    memory.holders[1][b.pid] = 10
    async with reclaimer(
        probe=ScriptedProbe(memory.read), memory_threshold=0.85, memory_target=0.8
    ) as sup:
        for address, proc in (("c", c), ("a", a), ("b", b)):
            sup.register(address, f"model-{address}", process=proc)
        assert evicted(await sup.check()) == ["b"]
        assert loaded(sup) == ["c", "a"]


async def test_memory_held_by_a_grandchild_counts_for_the_registered_parent(
    children: Children,
) -> None:
    memory = ProcessMemory(70)
    older = await children.sleeper()
    parent, grandchild = await children.parent_with_grandchild()
    memory.holders[0][grandchild] = 20  # e.g. a wrapper script whose child loaded the model
    async with reclaimer(
        probe=ScriptedProbe(memory.read), memory_threshold=0.85, memory_target=0.75
    ) as sup:
        sup.register("older", "model-older", process=older)
        sup.register("wrapped", "model-wrapped", process=parent)
        assert evicted(await sup.check()) == ["wrapped"]
        assert is_gone(parent.pid)
        assert is_gone(grandchild)
        assert loaded(sup) == ["older"]


# -- waiting for the memory to come back ---------------------------------------------------------


async def test_waits_for_the_release_before_deciding_again() -> None:
    memory = Memory(74)
    memory.release_after = 1  # the first reading after the stop still shows the memory
    async with reclaimer(
        memory, memory_threshold=0.9, memory_target=0.85, memory_recovery_timeout=5
    ) as sup:
        sup.register("a", "model-a")
        sup.register("b", "model-b")
        memory.hold("a", 11)
        memory.hold("b", 10)
        assert evicted(await sup.check()) == ["a"]  # not "b" too on the stale reading
        assert memory.log == ["read 95", "stop a", "read 95", "read 84"]
        assert memory.read_times[-1] - memory.read_times[-2] >= 0.2  # polled, not spun
        assert loaded(sup) == ["b"]


async def test_memory_that_never_comes_back_is_waited_for_at_most_the_recovery_timeout() -> None:
    memory = Memory(65)
    memory.never_release = True  # e.g. held by a process the supervisor does not know
    recovery = 0.3
    async with reclaimer(
        memory, memory_threshold=0.9, memory_target=0.8, memory_recovery_timeout=recovery
    ) as sup:
        for address in ("a", "b", "pinned"):
            sup.register(address, f"model-{address}", pinned=address == "pinned")
            memory.hold(address, 10)
        with anyio.fail_after(10):
            assert evicted(await sup.check()) == ["a", "b"]
    # after each stop it re-read for the recovery timeout, then decided again on a fresh
    # reading: the evictions are spaced out, not done all at once
    a_at, b_at = memory.stop_times[:2]
    assert b_at - a_at >= recovery - 0.01
    log = memory.log
    between = log[log.index("stop a") + 1 : log.index("stop b")]
    assert between == ["read 95"] * len(between)
    assert len(between) >= 2


# -- broken probes -------------------------------------------------------------------------------


async def test_failing_probe_is_counted_and_skipped() -> None:
    memory = Memory(80)
    probe = memory.probe()
    probe.error = OSError("NVML driver went away")
    async with reclaimer(memory, probe=probe, memory_threshold=0.75) as sup:
        sup.register("a", "m")
        memory.hold("a", 10)
        assert await sup.check() == []
        assert await sup.check() == []
        assert sup.faults == {"memory probe: OSError": 2}
        assert loaded(sup) == ["a"]
        probe.error = None  # the supervisor went on: the next good reading is acted on
        assert evicted(await sup.check()) == ["a"]


class TrackedProbe(ScriptedProbe):
    """A ScriptedProbe that also says when a read has returned (or raised)."""

    def __init__(self, source: Callable[[], MemoryReading]) -> None:
        super().__init__(source)
        self.finished = threading.Event()

    def read(self) -> MemoryReading:
        try:
            return super().read()
        finally:
            self.finished.set()


async def test_hanging_probe_is_abandoned_after_probe_timeout() -> None:
    memory = Memory(80)
    probe = TrackedProbe(memory.read)
    probe.hang = 0.5
    async with reclaimer(memory, probe=probe, memory_threshold=0.75, probe_timeout=0.1) as sup:
        sup.register("a", "m")
        memory.hold("a", 10)
        with anyio.fail_after(0.4):  # well before the read returns
            assert await sup.check() == []
        assert sup.faults == {"memory probe: TimeoutError": 1}
        async with sup.busy("a"):  # the supervisor keeps serving meanwhile
            pass
        assert await anyio.to_thread.run_sync(probe.finished.wait, 5)  # the abandoned read
        assert probe.reads == 1
        probe.hang = 0
        assert evicted(await sup.check()) == ["a"]


class ReturnsJunk:
    """A probe breaking the protocol: read() returns something that is not a MemoryReading."""

    def read(self) -> MemoryReading:
        return cast(MemoryReading, {"total": 100, "used": 101})


NONSENSE: dict[str, Sequence[DeviceMemory]] = {
    "used-over-total": [DeviceMemory(0, "gpu", gib(100), gib(101))],
    "negative-used": [DeviceMemory(0, "gpu", gib(100), -1)],
    "negative-total": [DeviceMemory(0, "gpu", -gib(100), gib(90))],
    "zero-total": [DeviceMemory(0, "gpu", 0, 0)],
    "duplicate-device": [DeviceMemory(0, "gpu", gib(100), gib(90))] * 2,
    "negative-process-bytes": [DeviceMemory(0, "gpu", gib(100), gib(90), processes={1: -5})],
}


@pytest.mark.parametrize("devices", list(NONSENSE.values()), ids=list(NONSENSE))
async def test_nonsense_readings_are_counted_and_skipped(devices: Sequence[DeviceMemory]) -> None:
    probe = ScriptedProbe(devices)
    async with reclaimer(probe=probe, memory_threshold=0.75) as sup:
        sup.register("a", "m")
        assert await sup.check() == []
        assert sup.faults == {"memory probe: ValueError": 1}
        assert loaded(sup) == ["a"]
        probe.source = [DeviceMemory(0, "gpu", gib(100), gib(90))]
        assert evicted(await sup.check()) == ["a"]


async def test_a_probe_returning_junk_is_counted_and_skipped() -> None:
    async with reclaimer(probe=ReturnsJunk(), memory_threshold=0.75) as sup:
        sup.register("a", "m")
        assert await sup.check() == []
        assert sup.faults == {"memory probe: ValueError": 1}
        assert loaded(sup) == ["a"]


# -- fit before load -----------------------------------------------------------------------------


async def test_make_room_for_memory_evicts_holders_first_until_it_fits() -> None:
    memory = Memory(50)
    async with reclaimer(memory, memory_threshold=0.75) as sup:
        sup.register("a", "model-a", size=gib(5))
        sup.register("b", "model-b", size=gib(20))
        memory.hold("a", 5)
        memory.hold("b", 20)
        # 75 used + 15 needed must stay at or under 75: 15 missing; "b" holds the most
        assert evicted(await sup.make_room(memory=gib(15))) == ["b"]
        assert loaded(sup) == ["a"]
        # it fits now (60 + 15 = 75, at the threshold): nothing more to do
        assert await sup.make_room(memory=gib(15)) == []


async def test_make_room_for_memory_uses_any_device_where_it_fits() -> None:
    memory = Memory(70, 40)
    async with reclaimer(memory, memory_threshold=0.75) as sup:
        sup.register("a", "m")
        memory.hold("a", 5, device=0)
        assert await sup.make_room(memory=gib(30)) == []  # GPU 1 takes it: 70 <= 75
        with pytest.raises(CapacityError):
            await sup.make_room(memory=gib(36), timeout=0)  # fits nowhere, even with "a" gone


async def test_make_room_for_memory_raises_with_the_missing_bytes() -> None:
    memory = Memory(60)
    async with reclaimer(memory, memory_threshold=0.75) as sup:
        sup.register("a", "model-a", size=gib(5))
        sup.register("p", "model-p", pinned=True)
        memory.hold("a", 5)
        memory.hold("p", 5)
        with pytest.raises(CapacityError) as info:
            await sup.make_room(memory=gib(20), timeout=0)
        # "a" was evicted (70 -> 65); 65 + 20 - 75 = 10 GiB still missing, "p" is pinned
        assert evicted(info.value.evictions) == ["a"]
        assert info.value.missing_bytes == gib(10)
        assert loaded(sup) == ["p"]


async def test_make_room_for_memory_does_not_succeed_while_memory_is_missing() -> None:
    memory = Memory(60)
    memory.gate = anyio.Event()  # the stop of "x" hangs in its callback
    outcome: list[object] = []
    async with reclaimer(memory, memory_threshold=0.75, stop_timeout=5) as sup:
        sup.register("x", "model-x")
        memory.hold("x", 20)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.evict, "x")
            with anyio.fail_after(5):
                await memory.stop_started.wait()
            try:
                # 80 used + 10 needed > 75 and nothing else to evict: no room without waiting
                outcome.append(await sup.make_room(memory=gib(10), timeout=0))
            except CapacityError as exc:
                outcome.append(exc)
            finally:
                memory.gate.set()
    [error] = outcome
    assert isinstance(error, CapacityError)
    assert error.missing_bytes == gib(15)


async def test_make_room_for_memory_waits_for_a_stop_in_progress() -> None:
    memory = Memory(60)
    memory.gate = anyio.Event()
    results: list[list[Eviction]] = []
    async with reclaimer(memory, memory_threshold=0.75, stop_timeout=5) as sup:
        sup.register("x", "model-x")
        memory.hold("x", 20)

        async def make_room() -> None:
            results.append(await sup.make_room(memory=gib(10), timeout=5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.evict, "x")
            with anyio.fail_after(5):
                await memory.stop_started.wait()
            tg.start_soon(make_room)
            await anyio.wait_all_tasks_blocked()
            try:
                assert results == []  # still 80 used: the load must not go ahead yet
            finally:
                memory.gate.set()
        assert results == [[]]
        assert memory.used(0) == 60


async def test_acquire_with_memory_makes_room_before_starting() -> None:
    memory = Memory(50)

    async def start_model(model: str) -> tuple[str, None]:
        memory.log.append(f"start {model}")
        memory.hold("new", 15)
        return "new", None

    async with reclaimer(memory, memory_threshold=0.75) as sup:
        sup.register("a", "model-a", size=gib(5))
        sup.register("b", "model-b", size=gib(20))
        memory.hold("a", 5)
        memory.hold("b", 20)
        async with sup.acquire("model-new", start_model, memory=gib(15)) as backend:
            assert backend.address == "new"
        assert memory.log.index("stop b") < memory.log.index("start model-new")
        assert "stop a" not in memory.log
        assert loaded(sup) == ["a", "new"]


class GatedProbe:
    """Reads ``memory`` only once ``gate`` is set (a slow read in flight); ``started`` is set
    when a read is waiting at the gate."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.gate = threading.Event()
        self.started = threading.Event()

    def read(self) -> MemoryReading:
        self.started.set()
        self.gate.wait(10)
        return self.memory.read()


async def test_make_room_for_memory_while_another_read_is_in_flight() -> None:
    memory = Memory(60)
    probe = GatedProbe(memory)
    results: list[list[Eviction]] = []
    async with reclaimer(memory, probe=probe, memory_threshold=0.85, probe_timeout=5) as sup:
        sup.register("a", "model-a", size=gib(20))
        memory.hold("a", 20)

        async def make_room() -> None:
            results.append(await sup.make_room(memory=gib(10), timeout=5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.check)  # 80% is under the threshold: this check evicts nothing
            assert await anyio.to_thread.run_sync(probe.started.wait, 5)
            tg.start_soon(make_room)  # 80 + 10 > 85: "a" must go
            await anyio.wait_all_tasks_blocked()
            probe.gate.set()
        assert [evicted(r) for r in results] == [["a"]]
        assert sup.faults == {}


# -- the periodic check --------------------------------------------------------------------------


async def test_periodic_check_evicts_without_an_explicit_check() -> None:
    memory = Memory(80)
    async with reclaimer(memory, memory_threshold=0.85, check_interval=0.05) as sup:
        stream = sup.events()
        sup.register("a", "m")
        memory.hold("a", 10)
        with anyio.fail_after(5):
            event = await stream.__anext__()
        assert (event.address, event.reason, event.ok) == ("a", MEMORY, True)
        assert sup.loaded_count == 0
        assert "stop a" in memory.log


async def test_check_during_a_periodic_recovery_wait_evicts_nothing_more() -> None:
    memory = Memory(75)
    memory.release_after = 3  # a's memory shows as free only on the fourth read after its stop
    async with reclaimer(
        memory,
        memory_threshold=0.9,
        memory_target=0.85,
        check_interval=0.05,
        memory_recovery_timeout=5,
    ) as sup:
        stream = sup.events()
        for address in "ab":
            sup.register(address, f"model-{address}")
            memory.hold(address, 10)
        with anyio.fail_after(5):
            first = await stream.__anext__()  # the periodic pass has stopped "a"
        assert first.address == "a"
        assert memory.used(0) == 95  # and is waiting for its memory to come back
        await sup.check()
        assert "stop b" not in memory.log  # 85% once a's memory is back: "b" must stay
        assert loaded(sup) == ["b"]
        assert sup.faults == {}
