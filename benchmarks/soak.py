"""Soak: real subprocess backends under continuous load for about a minute (not in CI).

``python benchmarks/soak.py [--seconds 60] [--workers 16] [--seed N] [--json PATH]``
(``nox -s soak -- --seconds 120`` passes options through)

Each backend is a real child process (``sys.executable -c ...``) that touches a few MiB so they
are resident, then sleeps until it is stopped. Worker tasks loop until the end: pick a model
(skewed, so some go idle), ``async with sup.acquire(model, start)`` (which loads it on demand:
``start`` spawns the process and returns ``(address, process)``), make one to three calls in
``busy()`` with short sleeps and a ``progress()``, rest a moment, again. Meanwhile:

- idle eviction: ``idle_timeout`` 0.5 s (the rarely used models go);
- LRU eviction: ``max_loaded`` 5 (four popular models and a tail of rare ones: loading a rare
  one past the limit evicts the least recently used idle backend);
- memory eviction: a ``ScriptedProbe`` whose used figure is 1 GiB + 1.5 GiB per live backend
  process, out of 10 GiB, with a threshold of 80 % and a target of 70 %: five loaded backends
  are over it and the reclaimer (every second) evicts down to four, re-reading after each stop;
- crashes: now and then a backend process is killed from outside (``exited``).

Every eviction is read from ``sup.events()``; the soak reaps each stopped process (the
supervisor never reaps). After a warm-up (a sixth of the run, at most 10 s) the start figures
are taken; the end figures when the load stops, before the supervisor closes; the children
count after it closed. Printed at the end, with targets: calls made, evictions by reason, RSS at
start and end (growth < 5 %), open file descriptors at start and end (equal), child processes
left (zero). The exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import psutil

from watchdog_async import (
    Backend,
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    DeviceMemory,
    MemoryReading,
    Supervisor,
    UnknownBackendError,
)
from watchdog_async.testing import ScriptedProbe, gib

MODELS = tuple(f"model-{i}" for i in range(10))
WEIGHTS = (1.0, 0.5, 0.3, 0.2, *(0.004,) * 6)  # four popular models, a tail of rare ones
HOLD_MIB = 4  # resident memory each backend process touches
BACKEND = f"""
import sys, time
held = bytearray({HOLD_MIB} * 1024 * 1024)
held[::4096] = b"x" * len(held[::4096])
time.sleep(3600)
"""
GROWTH_TARGET = 0.05


@dataclass
class Soak:
    rng: random.Random
    until: float = 0.0
    popens: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000))
    calls: int = 0
    acquires: int = 0
    loads: int = 0
    peak_loaded: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    failed_evictions: int = 0

    async def start(self, model: str) -> tuple[str, subprocess.Popen[bytes]]:
        return self.spawn()

    def spawn(self) -> tuple[str, subprocess.Popen[bytes]]:
        """Start one backend process (fork + exec: a few milliseconds, not worth a thread)."""
        address = f"127.0.0.1:{next(self.ports)}"
        proc = subprocess.Popen(
            [sys.executable, "-c", BACKEND],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.popens[address] = proc
        self.loads += 1
        return address, proc

    def reap(self) -> None:
        """Collect the exit status of every stopped backend (never blocks)."""
        for address, proc in list(self.popens.items()):
            if proc.poll() is not None:
                del self.popens[address]

    def live_children(self) -> int:
        """Backend processes alive now (zombies excluded); safe from a worker thread."""
        count = 0
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    count += 1
        return count

    def reading(self) -> MemoryReading:
        used = gib(1) + gib(1.5) * self.live_children()
        return MemoryReading((DeviceMemory(0, "scripted GPU", gib(10), min(used, gib(10))),))


async def worker(sup: Supervisor, soak: Soak, rng: random.Random) -> None:
    while time.monotonic() < soak.until:
        model = rng.choices(MODELS, WEIGHTS)[0]
        try:
            async with sup.acquire(model, soak.start) as backend:
                soak.acquires += 1
                for _ in range(rng.randint(1, 3)):
                    async with sup.busy(backend.address) as call:
                        await anyio.sleep(rng.uniform(0.001, 0.02))
                        call.progress()
                    soak.calls += 1
        except (BackendStoppedError, UnknownBackendError, BackendBusyError, CapacityError) as exc:
            soak.refusals[type(exc).__name__] += 1
        await anyio.sleep(rng.uniform(0.0, 0.1))


async def watch(sup: Supervisor, soak: Soak, ready: anyio.Event) -> None:
    events = sup.events(buffer=100_000)
    ready.set()
    async for eviction in events:
        soak.evictions[eviction.reason.value] += 1
        if not eviction.ok:
            soak.failed_evictions += 1
        soak.reap()
    if events.dropped:
        soak.refusals["events dropped"] += events.dropped


async def crasher(sup: Supervisor, soak: Soak, rng: random.Random) -> None:
    """Now and then a backend process dies from outside."""
    while time.monotonic() < soak.until:
        await anyio.sleep(rng.uniform(3.0, 7.0))
        live = [p for p in soak.popens.values() if p.poll() is None]
        if live:
            with contextlib.suppress(ProcessLookupError):
                rng.choice(live).send_signal(signal.SIGKILL)


async def sampler(sup: Supervisor, soak: Soak) -> None:
    while time.monotonic() < soak.until:
        soak.peak_loaded = max(soak.peak_loaded, sup.loaded_count)
        soak.reap()
        await anyio.sleep(0.1)


def figures_now() -> tuple[int, int]:
    gc.collect()
    me = psutil.Process()
    return me.memory_info().rss, me.num_fds()


async def shutdown(backend: Backend) -> None:
    """The graceful stop a real server would ask for; the signals follow it."""
    await anyio.lowlevel.checkpoint()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    soak = Soak(rng)
    probe = ScriptedProbe(soak.reading)
    sup = Supervisor(
        shutdown=shutdown,
        memory_probe=probe,
        idle_timeout=0.5,
        busy_timeout=10,
        max_loaded=5,
        memory_threshold=0.8,
        memory_target=0.7,
        check_interval=1.0,
        memory_recovery_timeout=1.0,
        stop_timeout=1.0,
        eviction_timeout=2.0,
    )
    began = time.monotonic()
    soak.until = began + args.seconds
    warmup = min(10.0, args.seconds / 6)
    async with anyio.create_task_group() as outside:
        ready = anyio.Event()
        async with sup:
            outside.start_soon(watch, sup, soak, ready)
            await ready.wait()
            async with anyio.create_task_group() as load:
                for _ in range(args.workers):
                    load.start_soon(worker, sup, soak, random.Random(rng.random()))
                load.start_soon(crasher, sup, soak, random.Random(rng.random()))
                load.start_soon(sampler, sup, soak)
                await anyio.sleep(warmup)
                rss_start, fds_start = figures_now()
                calls_at_start = soak.calls
            stopped_at = time.monotonic()
            rss_end, fds_end = figures_now()
            loaded_at_end = sup.loaded_count
            faults = sup.faults
        # closed: every backend stopped (reason closing); collect them all
        with anyio.fail_after(10):
            while soak.popens:
                soak.reap()
                await anyio.sleep(0.05)
    left = [p.pid for p in psutil.Process().children(recursive=True)]
    elapsed = time.monotonic() - began
    print(
        f"load stopped {stopped_at - soak.until:.2f} s after its end; closed and reaped "
        f"{time.monotonic() - stopped_at:.2f} s later"
    )
    return {
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "calls": soak.calls,
        "calls after warm-up": soak.calls - calls_at_start,
        "acquires": soak.acquires,
        "loads (processes started)": soak.loads,
        "peak loaded": soak.peak_loaded,
        "loaded when the load stopped": loaded_at_end,
        "evictions by reason": dict(soak.evictions.most_common()),
        "evictions not confirmed stopped": soak.failed_evictions,
        "calls refused or failed": dict(soak.refusals.most_common()),
        "faults": faults,
        "probe reads": probe.reads,
        "rss start": rss_start,
        "rss end": rss_end,
        "rss growth": (rss_end - rss_start) / rss_start,
        "fds start": fds_start,
        "fds end": fds_end,
        "children left": len(left),
    }


def report(result: dict[str, Any]) -> bool:
    mib = 1024 * 1024
    growth = result["rss growth"]
    checks = [
        (
            "RSS growth after warm-up",
            f"{result['rss start'] / mib:.1f} -> {result['rss end'] / mib:.1f} MiB ({growth:+.1%})",
            f"< {GROWTH_TARGET:.0%}",
            growth < GROWTH_TARGET,
        ),
        (
            "open file descriptors",
            f"{result['fds start']} -> {result['fds end']}",
            "equal",
            result["fds start"] == result["fds end"],
        ),
        ("child processes left", str(result["children left"]), "0", result["children left"] == 0),
        (
            "evictions not confirmed stopped",
            str(result["evictions not confirmed stopped"]),
            "0",
            result["evictions not confirmed stopped"] == 0,
        ),
    ]
    print(f"soak: {result['seconds']} s, {result['workers']} workers")
    for key in (
        "calls",
        "calls after warm-up",
        "acquires",
        "loads (processes started)",
        "peak loaded",
        "evictions by reason",
        "calls refused or failed",
        "faults",
        "probe reads",
    ):
        print(f"  {key}: {result[key]}")
    ok = True
    for name, value, target, passed in checks:
        ok &= passed
        print(f"  {name:<34} {value:<32} target {target:<6} {'ok' if passed else 'MISS'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak: real backends under load.")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--workers", type=int, default=16, help="tasks making calls")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the load")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.workers <= 0:
        parser.error("--seconds and --workers must be positive")
    result = asyncio.run(run(args))
    ok = report(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
