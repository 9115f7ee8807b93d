"""Figure 3: event-loop lag added by the supervisor under load.

A ticker sleeps 1 ms in a loop and records how late each wake-up is (wall clock). Meanwhile
1,000 tasks call ``busy()`` in a loop, each call awaiting a simulated request of 20 to 100 ms
(about 16,000 calls a second in all). Two variants, interleaved round by round, same seed:

- ``without``: the tasks use a do-nothing async context manager; no supervisor runs;
- ``with``: a Supervisor tracking 10,000 backends (the tasks use 1,000 of them) with
  busy_timeout 5 min, idle_timeout 1 h, and the memory reclaimer on with a scripted probe that
  takes 2 ms per read (in a worker thread, as NVML would), checked every 100 ms.

Reported: the p99 of the ticker's lateness in each variant's best (lowest) round, and the
difference. Target: at most 1 ms added at p99. On a shared machine other processes' bursts
move a round's p99 by milliseconds, so many short rounds are run and the best kept; the
median of rounds is shown too. For context: the event-loop thread's CPU use in each variant
(the noise-free part of the lag), and how much longer a full garbage collection takes with
10,000 backends tracked (a pause that comes every few tens of seconds, not at p99).

Run: ``python benchmarks/bench_lag.py``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time
from collections.abc import Callable

from _common import AsyncCM, Null, Row, finish, info, median, parse_args, percentile, show

from watchdog_async import DeviceMemory, Supervisor
from watchdog_async.testing import ScriptedProbe, gib

TICK = 0.001
TARGET_MS = 1.0


async def load_run(
    make: Callable[[str], AsyncCM], addresses: list[str], tasks: int, duration: float, seed: int
) -> tuple[list[float], int, float]:
    """Lateness of each tick (seconds), the number of calls made, and the fraction of the
    time the event-loop thread was on a CPU, over ``duration``."""
    rng = random.Random(seed)
    work = [[rng.uniform(0.020, 0.100) for _ in range(64)] for _ in range(tasks)]
    stop = False
    calls = 0

    async def worker(index: int) -> None:
        nonlocal calls
        address = addresses[index % len(addresses)]
        mine = work[index]
        sleep = asyncio.sleep
        i = 0
        await sleep(mine[-1] * rng.random())  # spread the starts
        while not stop:
            async with make(address):
                await sleep(mine[i & 63])
            i += 1
        calls += i

    lateness: list[float] = []

    async def ticker() -> None:
        clock = time.perf_counter
        sleep = asyncio.sleep
        while not stop:
            before = clock()
            await sleep(TICK)
            lateness.append(clock() - before - TICK)

    workers = [asyncio.create_task(worker(i)) for i in range(tasks)]
    await asyncio.sleep(0.12)  # every worker is in its loop
    tick = asyncio.create_task(ticker())
    cpu = time.thread_time()
    await asyncio.sleep(duration)
    cpu = time.thread_time() - cpu
    stop = True
    await tick
    await asyncio.gather(*workers)
    return lateness, calls, cpu / duration


def full_gc_ms(repeat: int = 5) -> float:
    """Best time of a full garbage collection, in ms."""
    best = math.inf
    for _ in range(repeat):
        began = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


async def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    quick = args.quick
    backends = 1_000 if quick else 10_000
    tasks = 100 if quick else 1_000
    duration = 0.3 if quick else 1.0
    rounds = args.rounds or (1 if quick else 10)

    addresses = [f"10.3.{i}:8080" for i in range(backends)]
    probe = ScriptedProbe([DeviceMemory(0, "GPU 0", total=gib(80), used=gib(40))])
    probe.hang = 0.002
    print(
        f"Figure 3: 1 ms ticker lateness, {tasks:,} tasks in busy() loops, "
        f"{backends:,} backends, {duration:g} s x {rounds} rounds"
    )
    variants = ("without", "with")
    p99: dict[str, list[float]] = {v: [] for v in variants}
    p50: dict[str, list[float]] = {v: [] for v in variants}
    rate: dict[str, list[float]] = {v: [] for v in variants}
    busy: dict[str, list[float]] = {v: [] for v in variants}
    gc_ms: dict[str, float] = {}
    for index in range(rounds):
        for variant in variants if index % 2 == 0 else variants[::-1]:
            if variant == "without":
                lateness, calls, cpu = await load_run(Null, addresses, tasks, duration, index)
                gc_ms.setdefault(variant, full_gc_ms())
            else:
                async with Supervisor(
                    busy_timeout=300,
                    idle_timeout=3600,
                    memory_threshold=0.9,
                    check_interval=0.1,
                    memory_probe=probe,
                ) as sup:
                    for address in addresses:
                        sup.register(address, "model")
                    lateness, calls, cpu = await load_run(
                        sup.busy, addresses, tasks, duration, index
                    )
                    assert sup.loaded_count == backends
                    gc_ms.setdefault(variant, full_gc_ms())
            p99[variant].append(percentile(lateness, 99) * 1e3)
            p50[variant].append(percentile(lateness, 50) * 1e3)
            rate[variant].append(calls / duration)
            busy[variant].append(cpu)
    rows: list[Row] = []
    for variant in variants:
        info(
            "3",
            f"p99 lateness {variant} supervisor",
            min(p99[variant]),
            "ms",
            f"median of rounds {median(p99[variant]):.2f} ms, p50 {median(p50[variant]):.2f} ms, "
            f"{median(rate[variant]):,.0f} calls/s, loop on CPU {median(busy[variant]):.0%}",
        )
    added = min(p99["with"]) - min(p99["without"])
    rows.append(
        show(
            Row(
                "3",
                "p99 lateness added by the supervisor",
                added,
                "ms",
                f"<= {TARGET_MS:g} ms",
                added <= TARGET_MS,
                f"median of rounds: {median(p99['with']) - median(p99['without']):+.2f} ms",
            )
        )
    )
    info(
        "3",
        "loop CPU added by the supervisor",
        (median(busy["with"]) - median(busy["without"])) * 1e3,
        "ms",
        "per second of load",
    )
    info(
        "3",
        f"full gc.collect() added by {backends:,} backends",
        gc_ms["with"] - gc_ms["without"],
        "ms",
        f"{gc_ms['without']:.1f} -> {gc_ms['with']:.1f} ms",
    )
    finish(rows, args, started)
    return rows


if __name__ == "__main__":
    asyncio.run(main())
