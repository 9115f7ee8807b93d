"""configure() restarts the periodic interval from zero every time it is called, so an
application that calls configure() more often than check_interval (a config reloader, an
autoscaler adjusting max_concurrency) starves the memory check and the exited-process check
forever: the memory reclaimer never runs."""

from __future__ import annotations

import anyio

from watchdog_async import DeviceMemory, Supervisor
from watchdog_async.testing import ScriptedProbe, gib


async def test_configure_does_not_postpone_the_periodic_check() -> None:
    probe = ScriptedProbe([DeviceMemory(0, "gpu0", gib(10), gib(1))])  # well under threshold
    with anyio.fail_after(10):
        async with Supervisor(memory_threshold=0.9, check_interval=0.2, memory_probe=probe) as sup:
            # unrelated live changes, every 50 ms, for 1 s (5 check intervals)
            for i in range(20):
                sup.configure(max_waiting=100 + i)
                await anyio.sleep(0.05)
            reads = probe.reads
    assert reads >= 3, f"memory checked {reads} times in 5 check intervals"
