"""Figure 2: cost growth from 100 to 10,000 registered backends.

Two supervisors run side by side in one event loop, one tracking 100 backends and one 10,000
(no processes; busy_timeout 5 min, idle_timeout 1 h, so every backend has a pending idle
deadline; ``max_loaded`` equal to the count). Interleaved, best of N rounds:

- ``await sup.check()`` with nothing due (busy, idle and exit checks; no memory reclaimer);
- ``await sup.make_room()`` evicting exactly one backend (the least recently used; a no-op
  async shutdown callback, no process). After each, a fresh backend is registered outside the
  timed section so the count stays put.

Target: time at 10,000 <= 10x the time at 100, for each. For context (no target), the same
growth for LocalAI's design, ported: ``EnforceLRULimit`` (copies and sorts every backend under
the lock) and one poll of ``checkBusy`` + ``checkIdle`` (a scan of every backend).

Run: ``python benchmarks/bench_growth.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

from _common import Row, finish, gc_paused, interleaved, median, parse_args, show
from localai_port import WatchDog

from watchdog_async import Backend, Supervisor

TARGET = 10.0


async def _noop_shutdown(backend: Backend) -> None:
    return None


def _fill(sup: Supervisor, count: int, names: Callable[[], str]) -> None:
    for _ in range(count):
        address = names()
        sup.register(address, f"model-{address}")


async def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(__doc__, argv)
    started = time.perf_counter()
    quick = args.quick
    small, large = (100, 1_000) if quick else (100, 10_000)
    rounds = args.rounds or (2 if quick else 7)
    checks = 20 if quick else 300  # check() calls per measurement
    evictions = 10 if quick else 100  # make_room() calls per measurement

    counter = itertools.count()

    def new_address() -> str:
        return f"backend-{next(counter)}"

    rows: list[Row] = []
    print(f"Figure 2: growth from {small:,} to {large:,} backends, best of {rounds} rounds")
    settings = {"busy_timeout": 300, "idle_timeout": 3600, "shutdown": _noop_shutdown}
    async with (
        Supervisor(max_loaded=small, **settings) as sup_small,  # type: ignore[arg-type]
        Supervisor(max_loaded=large, **settings) as sup_large,  # type: ignore[arg-type]
    ):
        sups = {small: sup_small, large: sup_large}
        for count, sup in sups.items():
            _fill(sup, count, new_address)
        await asyncio.sleep(0.01)

        def check(sup: Supervisor) -> Callable[[], Awaitable[float]]:
            async def measure() -> float:
                with gc_paused():
                    begin = time.perf_counter()
                    for _ in range(checks):
                        evicted = await sup.check()
                    elapsed = time.perf_counter() - begin
                assert not evicted, "nothing should be due"
                return elapsed / checks

            return measure

        def make_room(sup: Supervisor, count: int) -> Callable[[], Awaitable[float]]:
            async def measure() -> float:
                samples = []
                with gc_paused():
                    for _ in range(evictions):
                        begin = time.perf_counter()
                        evicted = await sup.make_room()
                        samples.append(time.perf_counter() - begin)
                        assert len(evicted) == 1 and evicted[0].ok, evicted
                        _fill(sup, 1, new_address)  # back to `count` (not timed)
                assert sup.loaded_count == count
                return median(samples)

            return measure

        variants = {
            **{f"check() at {n:,}": check(sup) for n, sup in sups.items()},
            **{f"make_room() at {n:,}": make_room(sup, n) for n, sup in sups.items()},
        }
        for run in variants.values():  # warm-up
            await run()
        results = await interleaved(variants, rounds)
        best = {name: min(values) * 1e6 for name, values in results.items()}
        for what in ("check()", "make_room()"):
            low, high = best[f"{what} at {small:,}"], best[f"{what} at {large:,}"]
            show(Row("2", f"{what} at {small:,} backends", low, "us", "", None))
            show(Row("2", f"{what} at {large:,} backends", high, "us", "", None))
            growth = high / low
            rows.append(
                show(
                    Row(
                        "2",
                        f"{what} growth {small:,} -> {large:,}",
                        growth,
                        "x",
                        f"<= {TARGET:g}x",
                        growth <= TARGET,
                    )
                )
            )

    # context (no target): the reference design's growth on the same sizes
    _port_growth(small, large, rounds, 3 if quick else 20)
    finish(rows, args, started)
    return rows


def _port_growth(small: int, large: int, rounds: int, repeat: int) -> list[Row]:
    def watchdog(count: int) -> WatchDog:
        wd = WatchDog(shutdown_model=lambda model: None, idle_timeout=3600, lru_limit=count)
        for i in range(count):
            address = f"10.1.{i}:8080"
            wd.add_address_model_map(address, f"model-{i}")
            wd.add(address, None)
            wd.mark(address)
            wd.unmark(address)
        return wd

    dogs = {count: watchdog(count) for count in (small, large)}
    serial = itertools.count()

    def enforce(wd: WatchDog) -> float:
        samples = []
        for _ in range(repeat):
            begin = time.perf_counter()
            assert wd.enforce_lru_limit(0) == 1
            samples.append(time.perf_counter() - begin)
            address = f"10.2.{next(serial)}:8080"  # back to the limit (not timed)
            wd.add_address_model_map(address, "model")
            wd.unmark(address)
        return median(samples)

    def poll(wd: WatchDog) -> float:
        begin = time.perf_counter()
        for _ in range(repeat):
            wd.check_busy()
            wd.check_idle()
        return (time.perf_counter() - begin) / repeat

    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for count, wd in dogs.items():
            with gc_paused():
                for name, fn in (("EnforceLRULimit", enforce), ("checkBusy+checkIdle", poll)):
                    value = fn(wd)
                    key = (name, count)
                    best[key] = min(best.get(key, value), value)
    rows = []
    for name in ("EnforceLRULimit", "checkBusy+checkIdle"):
        growth = best[(name, large)] / best[(name, small)]
        rows.append(
            show(
                Row(
                    "2",
                    f"port {name} growth {small:,} -> {large:,}",
                    growth,
                    "x",
                    "",
                    None,
                    f"{best[(name, small)] * 1e6:.1f} -> {best[(name, large)] * 1e6:.1f} µs",
                )
            )
        )
    return rows


if __name__ == "__main__":
    asyncio.run(main())
