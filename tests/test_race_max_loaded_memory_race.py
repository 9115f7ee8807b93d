"""_make_room decides `need == 0` before awaiting the memory probe and reserves after it
without looking again: a load that reserved meanwhile is not counted, and max_loaded is
exceeded."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel

from watchdog_async import DeviceMemory, MemoryReading, Supervisor
from watchdog_async.testing import ScriptedProbe, gib


async def test_acquire_with_memory_respects_max_loaded() -> None:
    reading_may_return = threading.Event()

    def read() -> MemoryReading:
        reading_may_return.wait(10)
        return MemoryReading(devices=(DeviceMemory(0, "gpu0", total=gib(80), used=gib(1)),))

    probe = ScriptedProbe(read)
    b_registered = anyio.Event()

    async def start(model: str) -> str:
        if model == "b":
            b_registered.set()
        return f"addr-{model}"

    hold = anyio.Event()
    with anyio.fail_after(10):
        async with Supervisor(max_loaded=1, memory_probe=probe, eviction_timeout=1) as sup:

            async def use(model: str, memory: int | None) -> None:
                async with sup.acquire(model, start, memory=memory):
                    await hold.wait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(use, "a", gib(1))  # checks memory (a read in a worker thread)
                await anyio.lowlevel.checkpoint()
                tg.start_soon(use, "b", None)  # no memory check: reserves and loads at once
                await b_registered.wait()
                await anyio.sleep(0.01)
                reading_may_return.set()  # a's check ends: it fits memory-wise
                for _ in range(5):
                    await anyio.sleep(0.01)
                loaded = sup.loaded_count
                hold.set()
    assert loaded <= 1, f"{loaded} backends loaded with max_loaded=1"
