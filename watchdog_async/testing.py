"""Helpers for your own tests: drive a Supervisor deterministically under pytest + anyio.

- :class:`ManualClock`: a hand-driven clock; pass ``clock=clock`` to the Supervisor and call
  ``clock.advance(seconds)``; the supervisor is woken when the clock moves.
- :class:`ScriptedProbe`: a memory probe that returns the readings you give it.
- :func:`settle`: wait until the supervisor has applied every queued busy event, run every
  check that is due, and finished every stop it started.

Example (an app's eviction behaviour)::

    async def test_idle_model_is_unloaded():
        clock = ManualClock()
        async with Supervisor(idle_timeout=60, clock=clock) as sup:
            sup.register("127.0.0.1:9001", "llama")
            clock.advance(61)
            await settle(sup)
            assert sup.loaded_count == 0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import anyio

from ._memory import DeviceMemory, MemoryReading

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ("ManualClock", "ScriptedProbe", "gib", "settle")


def gib(amount: float) -> int:
    """Bytes in ``amount`` GiB (for scripted readings)."""
    return int(amount * 1024**3)


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self._now

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called after every move (the Supervisor registers its wake-up here)."""
        self._listeners.append(callback)

    def advance(self, seconds: float) -> None:
        if not isinstance(seconds, int | float) or math.isnan(seconds) or seconds < 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r}")
        self._now += seconds
        for callback in list(self._listeners):
            callback()


class ScriptedProbe:
    """A :class:`MemoryProbe` that returns what the test scripts.

    ``source`` is a reading, a list of devices, or a callable returning either (called on
    every read, so it can model memory that falls as backends stop). Set ``error`` to make
    reads raise, ``hang`` to a number of seconds to make them block. ``reads`` counts reads.
    """

    def __init__(
        self,
        source: MemoryReading | Iterable[DeviceMemory] | Callable[[], MemoryReading] | None = None,
    ) -> None:
        self.source = source
        self.error: BaseException | None = None
        self.hang = 0.0
        self.reads = 0

    @property
    def description(self) -> str:
        return "scripted probe"

    def read(self) -> MemoryReading:
        self.reads += 1
        if self.hang:
            import time

            time.sleep(self.hang)
        if self.error is not None:
            raise self.error
        source = self.source
        if callable(source):
            source = source()
        if isinstance(source, MemoryReading):
            return source
        return MemoryReading(devices=tuple(source or ()))


async def settle(sup: Supervisor, *, rounds: int = 50) -> None:
    """Wait until ``sup`` has applied every queued event, run what is due, and finished
    every stop in progress (stops with real processes take real time)."""
    for _ in range(rounds):
        sup._drain()
        sup._wake_deadline_loop()
        await anyio.wait_all_tasks_blocked()
        stops = list(sup._stops)
        for stop in stops:
            await stop.wait()
        if not stops and not sup._queue.qsize():
            return
    raise RuntimeError(f"the supervisor did not settle within {rounds} rounds")
