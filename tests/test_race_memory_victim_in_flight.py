"""The memory pass (and make_room(memory=...)) choose victims after awaiting the per-process
attribution in a worker thread without applying the busy queue again: a call that entered
busy() meanwhile is not seen, and an UNFORCED memory eviction stops the backend under it."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator

import anyio
import pytest
from _children import sleeper_argv

import watchdog_async._supervisor as supmod
from watchdog_async import BackendStoppedError, DeviceMemory, MemoryReading, Supervisor
from watchdog_async.testing import ScriptedProbe, gib


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(sleeper_argv(), stdout=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


async def test_unforced_memory_eviction_never_stops_a_call_in_flight(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the consumer applies queued marks within _COALESCE; decisions must not rely on it
    # ("Decisions never wait for this (they apply the queue first)"): widen it to make the
    # interleaving deterministic
    monkeypatch.setattr(supmod, "_COALESCE", 1.0)
    in_attribution = threading.Event()
    proceed = threading.Event()

    def slow_tree_pids(ref: object) -> tuple[int, ...]:
        in_attribution.set()
        proceed.wait(10)
        return ()

    monkeypatch.setattr(supmod, "tree_pids", slow_tree_pids)
    reading = MemoryReading(
        devices=(DeviceMemory(0, "gpu0", total=gib(10), used=gib(9), processes={}),)
    )
    outcome: list[object] = []
    with anyio.fail_after(10):
        async with Supervisor(
            memory_probe=ScriptedProbe(reading),
            memory_threshold=0.5,
            check_interval=3600,
            stop_timeout=1,
            memory_recovery_timeout=0.1,
            force_eviction_when_busy=False,
        ) as sup:
            sup.register("a", "m", process=child)
            async with anyio.create_task_group() as tg:
                evictions: list[object] = []

                async def check() -> None:
                    evictions.extend(await sup.check())

                tg.start_soon(check)
                assert await anyio.to_thread.run_sync(in_attribution.wait, 10)
                try:
                    async with sup.busy("a"):  # enters while the pass is in the thread
                        proceed.set()
                        await anyio.sleep(0.2)
                    outcome.append("call completed")
                except BackendStoppedError as exc:
                    outcome.append(exc)
    assert outcome == ["call completed"], f"unforced memory eviction stopped a call: {outcome}"
