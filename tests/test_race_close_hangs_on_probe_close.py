"""_close() closes the probe it chose (NVML) in a worker thread that cannot be abandoned
(anyio.to_thread.run_sync without abandon_on_cancel): when the driver is wedged - the very
case probe_timeout exists for: a read already hung and was abandoned - nvmlShutdown blocks
too, and leaving the supervisor hangs past its shielded bound (3 x stop_timeout + 5 s),
forever. (The probe is injected as "owned" here, as default_probe() would make it.)"""

from __future__ import annotations

import threading
import time

import anyio

from watchdog_async import Supervisor
from watchdog_async._memory import MemoryReading


class WedgedProbe:
    """read() and close() both block on the (wedged) driver until the test releases it."""

    def __init__(self) -> None:
        self.driver = threading.Event()

    def read(self) -> MemoryReading:
        self.driver.wait(3)
        return MemoryReading(())

    def close(self) -> None:
        self.driver.wait(3)


async def test_leaving_is_bounded_even_if_probe_close_hangs() -> None:
    probe = WedgedProbe()
    sup = Supervisor(memory_threshold=0.9, probe_timeout=0.05, check_interval=0.05)
    sup._close_bound = lambda: 0.5  # type: ignore[method-assign]  # keep the test short
    try:
        with anyio.fail_after(5):
            async with sup:
                sup._probe, sup._owns_probe = probe, True  # as default_probe() would set them
                await anyio.sleep(0.2)  # a read hangs and is abandoned after probe_timeout
                assert sup.faults  # counted: "memory probe: TimeoutError"
                started = time.monotonic()
            took = time.monotonic() - started
    finally:
        probe.driver.set()
    assert took < 2.0, f"leaving took {took:.1f} s, bound 0.5 s"
