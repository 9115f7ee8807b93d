"""Figure 1: the cost of one busy() round trip, against LocalAI's design and against nothing.

One ``async with cm(address):`` enter and exit, *including the deferred work*: the supervisor
only queues a message on enter/exit, and its consumer task applies it later; that task's
wake-ups and every message's application are inside the timed section (each timed batch ends
by yielding to the loop, so the woken consumer runs, and then draining whatever is left).

Variants, same work around them, measured interleaved in one process, best of N rounds:

- ``floor``: a do-nothing async context manager (one object per call, like the others);
- ``port``: LocalAI's Mark/UnMark (``localai_port.py``: a lock and maps, no reference counts);
- ``ours``: ``Supervisor.busy()`` (reference counts, progress, cancellation of the caller);
- ``limited``: ``Supervisor.busy()`` on a backend with ``max_concurrency`` set (never reached):
  what admission control costs where it is on, for context; unlimited backends (``ours``) pay
  one attribute check for it.

Scenarios:

- ``sequential``: one task, calls back to back, empty body: the consumer is woken once per
  batch and applies the batch (one message per call: each call ends before its mark is applied);
- ``sequential, yielding body``: the body awaits ``asyncio.sleep(0)``, as a real call awaits
  I/O: the consumer runs inside every call, so each message is applied on its own (two
  messages and two consumer wake-ups per call): the worst case for a queued design;
- ``1,000 concurrent tasks``: each task makes calls whose body awaits ``asyncio.sleep(0)``;
  the consumer applies each loop iteration's messages in one batch;
- ``long calls``: 200 concurrent tasks whose calls last 2 ms, longer than the consumer lets
  messages gather (1 ms), as real inference calls do: two messages per call. Not part of the
  issue's figure; shown for context (the sleeping is not CPU time; the timers are the same
  work in every variant).

Time is the event-loop thread's CPU time (``time.thread_time``): every bit of work on the loop
counts, the consumer's included, while time the process spends descheduled by other processes
on a shared machine does not (``--clock wall`` for wall-clock time instead). Garbage collection
is off in timed sections; best of N rounds, after one warm-up round.

Target: ours <= 1.25x the port in every scenario. Run: ``python benchmarks/bench_busy.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from _common import Make, Null, Row, finish, gc_paused, info, interleaved, parse_args, show
from localai_port import PortBusy, WatchDog

from watchdog_async import Supervisor

ADDRESS = "127.0.0.1:50051"
LIMITED = "127.0.0.1:50052"
TARGET = 1.25
clock = time.thread_time


async def sequential(make: Make, settle: Callable[[], None], batch: int, batches: int) -> float:
    """Seconds per call: ``batches`` batches of ``batch`` back-to-back calls, empty body."""
    with gc_paused():
        started = clock()
        for _ in range(batches):
            for _ in range(batch):
                async with make(ADDRESS):
                    pass
            await asyncio.sleep(0)  # the woken consumer applies the batch here
            settle()
        elapsed = clock() - started
    return elapsed / (batch * batches)


async def yielding(make: Make, settle: Callable[[], None], calls: int) -> float:
    """Seconds per call: back-to-back calls whose body yields to the loop once."""
    sleep = asyncio.sleep
    with gc_paused():
        started = clock()
        for _ in range(calls):
            async with make(ADDRESS):
                await sleep(0)
        await sleep(0)
        settle()
        elapsed = clock() - started
    return elapsed / calls


async def concurrent(make: Make, settle: Callable[[], None], tasks: int, each: int) -> float:
    """Seconds per call: ``tasks`` tasks started together, each making ``each`` calls whose
    body yields once (task creation is outside the timed section)."""
    go = asyncio.Event()
    sleep = asyncio.sleep

    async def worker() -> None:
        await go.wait()
        for _ in range(each):
            async with make(ADDRESS):
                await sleep(0)

    running = [asyncio.create_task(worker()) for _ in range(tasks)]
    await sleep(0)  # every worker now waits on `go`
    with gc_paused():
        started = clock()
        go.set()
        await asyncio.gather(*running)
        await sleep(0)
        settle()
        elapsed = clock() - started
    return elapsed / (tasks * each)


async def long_calls(make: Make, settle: Callable[[], None], tasks: int, each: int) -> float:
    """CPU seconds per call: ``tasks`` tasks each making ``each`` calls that last 2 ms."""
    go = asyncio.Event()
    sleep = asyncio.sleep

    async def worker() -> None:
        await go.wait()
        for _ in range(each):
            async with make(ADDRESS):
                await sleep(0.002)

    running = [asyncio.create_task(worker()) for _ in range(tasks)]
    await sleep(0)
    with gc_paused():
        started = clock()
        go.set()
        await asyncio.gather(*running)
        await sleep(0.003)  # past the consumer's gathering window
        settle()
        elapsed = clock() - started
    return elapsed / (tasks * each)


def _nothing() -> None:
    return None


async def main(argv: list[str] | None = None) -> list[Row]:
    global clock
    args = parse_args(__doc__, argv, clock=True)
    started = time.perf_counter()
    if args.clock == "wall":
        clock = time.perf_counter
    quick = args.quick
    rounds = args.rounds or (2 if quick else 9)
    batch, batches = (100, 2) if quick else (1000, 20)
    calls = 200 if quick else 20_000
    tasks, each = (50, 4) if quick else (1000, 20)
    long_tasks, long_each = (20, 2) if quick else (200, 10)

    wd = WatchDog(shutdown_model=lambda model: None)
    wd.add_address_model_map(ADDRESS, "model")
    wd.add(ADDRESS, None)

    rows: list[Row] = []
    async with Supervisor(busy_timeout=300, idle_timeout=900) as sup:
        sup.register(ADDRESS, "model")
        sup.register(LIMITED, "model", max_concurrency=1 << 30)
        await asyncio.sleep(0.01)  # let the deadline loop plan its wake-up

        def port(address: str) -> PortBusy:
            return PortBusy(wd, address)

        makers: dict[str, tuple[Make, Callable[[], None]]] = {
            "floor": (Null, _nothing),
            "port": (port, _nothing),
            "ours": (sup.busy, sup._drain),
            "limited": (lambda address: sup.busy(LIMITED), sup._drain),
        }
        scenarios: dict[str, Callable[[Make, Callable[[], None]], Awaitable[float]]] = {
            "sequential": lambda m, s: sequential(m, s, batch, batches),
            "sequential, yielding body": lambda m, s: yielding(m, s, calls),
            f"{tasks:,} concurrent tasks": lambda m, s: concurrent(m, s, tasks, each),
            "long calls (context)": lambda m, s: long_calls(m, s, long_tasks, long_each),
        }
        print(
            f"Figure 1: busy() round trip, best of {rounds} rounds, interleaved, {args.clock} time"
        )
        for scenario, measure in scenarios.items():

            def variant(
                name: str, measure: Callable[[Make, Callable[[], None]], Awaitable[float]] = measure
            ) -> Callable[[], Awaitable[float]]:
                make, settle = makers[name]
                return lambda: measure(make, settle)

            variants = {name: variant(name) for name in makers}
            for run in variants.values():  # warm-up, discarded
                await run()
            results = await interleaved(variants, rounds)
            best = {name: min(values) * 1e6 for name, values in results.items()}
            for name in makers:
                info("1", f"{scenario}: {name} per call", best[name], "us")
            overhead = (best["ours"] - best["floor"]) / max(1e-9, best["port"] - best["floor"])
            ratio = best["ours"] / best["port"]
            if "context" in scenario:
                info("1", f"{scenario}: ours / port", ratio, "x", f"overhead {overhead:.1f}x")
            else:
                rows.append(
                    show(
                        Row(
                            "1",
                            f"{scenario}: ours / port",
                            ratio,
                            "x",
                            f"<= {TARGET}x",
                            ratio <= TARGET,
                            f"overhead above floor {overhead:.1f}x the port's",
                        )
                    )
                )
            info("1", f"{scenario}: ours / floor", best["ours"] / best["floor"], "x")
            info("1", f"{scenario}: limited / ours", best["limited"] / best["ours"], "x")
            info("1", f"{scenario}: port / floor", best["port"] / best["floor"], "x")
    finish(rows, args, started)
    return rows


if __name__ == "__main__":
    asyncio.run(main())
