"""Figure 5: memory per tracked backend, measured with tracemalloc at 10,000 backends.

The addresses and model names are the application's strings: they are built before the first
measurement and not counted. Measured inside a running Supervisor (busy_timeout 5 min,
idle_timeout 15 min, so each backend also has a deadline-heap entry), after a full collection:

- ``registered``: bytes allocated by ``register()`` per backend;
- ``after one call each``: the same after one ``busy()`` call on every backend (whatever a use
  leaves behind: a busy-deadline heap entry, a grown set, ...).

Target: at most 2 KiB per backend. For context, LocalAI's design ported (five maps) after the
same registration and one Mark/UnMark each.

Run: ``python benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

from _common import Row, finish, info, parse_args, show
from localai_port import WatchDog

from watchdog_async import Supervisor

TARGET = 2048


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    count = 1_000 if args.quick else 10_000
    addresses = [f"10.4.{i // 256}.{i % 256}:8080" for i in range(count)]
    models = [f"org/model-{i}-7b-q4" for i in range(count)]
    print(f"Figure 5: memory per tracked backend at {count:,} backends (tracemalloc)")

    rows: list[Row] = []
    tracemalloc.start()
    try:
        async with Supervisor(busy_timeout=300, idle_timeout=900) as sup:
            await asyncio.sleep(0)
            before = _traced()
            for address, model in zip(addresses, models, strict=True):
                sup.register(address, model)
            registered = _traced()
            for address in addresses:
                async with sup.busy(address):
                    pass
            sup._drain()
            await asyncio.sleep(0.01)
            used = _traced()
            assert sup.loaded_count == count
        wd = WatchDog(shutdown_model=lambda model: None)
        port_before = _traced()
        for address, model in zip(addresses, models, strict=True):
            wd.add_address_model_map(address, model)
            wd.add(address, None)
            wd.mark(address)
            wd.unmark(address)
        port_after = _traced()
    finally:
        tracemalloc.stop()

    per_registered = (registered - before) / count
    per_used = (used - before) / count
    rows += [
        show(
            Row(
                "5",
                f"per backend, registered ({count:,})",
                per_registered,
                "B",
                f"<= {TARGET:,} B",
                per_registered <= TARGET,
            )
        ),
        show(
            Row(
                "5",
                f"per backend, after one call each ({count:,})",
                per_used,
                "B",
                f"<= {TARGET:,} B",
                per_used <= TARGET,
            )
        ),
    ]
    info("5", "port: per backend (five maps)", (port_after - port_before) / count, "B")
    finish(rows, args, started)
    return rows


if __name__ == "__main__":
    asyncio.run(main())
