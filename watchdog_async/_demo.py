"""``python -m watchdog_async demo``: the supervisor at work on real backend processes, narrated.

Every backend is a small Python child process (``sys.executable -c ...``) that holds a few MiB
of memory, answers one line per connection on a loopback port, and exits on SIGTERM; one of them
("stuck") accepts a request and never answers. With short real-time timeouts the demo shows, in
a few seconds:

1. an LRU eviction (``max_loaded=2``, a third model is asked for),
2. idle unloads (``idle_timeout`` 1 s, turned on live with ``sup.configure``),
3. a hung backend stopped (``busy_timeout`` 1 s) and its caller failed with
   :class:`BackendStoppedError`,
4. a memory eviction. The memory readings in this demo are scripted
   (:class:`watchdog_async.testing.ScriptedProbe`): a pretend 16 GiB GPU on which every live
   backend process "holds" 3 GiB, and "another program" that takes 5 GiB on cue.

Each eviction is printed, with its reason value, as it arrives from ``sup.events()``. The exit
status is 0 when every expected eviction happened and no child process is left, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import psutil

from ._errors import BackendStoppedError
from ._events import EventStream, Eviction, EvictionReason
from ._memory import DeviceMemory, MemoryReading
from ._supervisor import Supervisor
from .testing import ScriptedProbe, gib

__all__ = ("add_demo_command", "run_demo")

HOST = "127.0.0.1"
HELD_BYTES = 8 * 1024**2  # real memory each backend process holds
CHILD_LIFETIME = 60.0  # a child left alone this long exits by itself (a bound, not a wait)

# pretend GPU of the scripted probe
PRETEND_TOTAL = gib(16)
PRETEND_BASE = gib(2)  # "the desktop"
PRETEND_PER_BACKEND = gib(3)
PRETEND_OTHER_PROGRAM = gib(5)
MEMORY_THRESHOLD = 0.8

SETTINGS: dict[str, Any] = {
    "max_loaded": 2,
    "idle_timeout": None,  # turned on (1 s) for the idle scene only, live
    "busy_timeout": 1.0,
    "check_interval": 0.2,
    "stop_timeout": 1.0,
    "memory_threshold": MEMORY_THRESHOLD,
    "memory_recovery_timeout": 2.0,
    "probe_timeout": 2.0,
    "start_timeout": 10.0,
    "eviction_timeout": 5.0,
}
IDLE_TIMEOUT = 1.0
EXPECT_WITHIN = 5.0  # seconds an expected eviction may take before the demo calls it missing

_CHILD = """
import os, signal, socket, sys, time

def leave(signum, frame):
    sys.exit(0)

signal.signal(signal.SIGTERM, leave)
held = bytearray({held})
for i in range(0, len(held), 4096):
    held[i] = 1  # touch every page: the memory is really resident
server = socket.create_server(("{host}", 0))
server.settimeout({lifetime})
print(server.getsockname()[1], flush=True)
while True:
    try:
        conn, _ = server.accept()
    except OSError:
        sys.exit(0)  # nobody came for a long while: leave by ourselves
    with conn:
        conn.settimeout({lifetime})
        conn.recv(1024)
        if {hung}:
            time.sleep({lifetime})  # never answers (SIGTERM still ends it)
            sys.exit(0)
        conn.sendall(b"%s (pid %d): hello\\n" % ({name!r}.encode(), os.getpid()))
"""


def child_argv(name: str, *, hung: bool = False) -> list[str]:
    """The argv of one demo backend process."""
    code = _CHILD.format(held=HELD_BYTES, host=HOST, lifetime=CHILD_LIFETIME, hung=hung, name=name)
    return [sys.executable, "-c", textwrap.dedent(code)]


class _Demo:
    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._t0 = time.monotonic()
        self.children: list[tuple[str, asyncio.subprocess.Process, psutil.Process]] = []
        self.other_program = 0  # pretend bytes taken by a program the supervisor does not own
        self.seen: list[Eviction] = []
        self.problems: list[str] = []
        self._arrived = anyio.Event()

    # -- narration --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self._out(f"[{time.monotonic() - self._t0:5.2f}s] {text}")

    def scene(self, title: str) -> None:
        self._out("")
        self.say(f"== {title} ==")

    def fail(self, text: str) -> None:
        self.problems.append(text)
        self.say(f"PROBLEM: {text}")

    # -- backends ---------------------------------------------------------------------------

    async def start(self, model: str) -> tuple[str, asyncio.subprocess.Process]:
        """The ``start`` of ``sup.acquire``: spawn a backend, wait for its port."""
        hung = model == "stuck"
        self.say(f"{model}: no backend loaded, starting a process")
        proc = await asyncio.create_subprocess_exec(
            *child_argv(model, hung=hung),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self.children.append((model, proc, psutil.Process(proc.pid)))
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"{model}: the backend process exited before it was ready")
        address = f"{HOST}:{int(line)}"
        rss = await anyio.to_thread.run_sync(self._rss, proc.pid)
        self.say(f"{model}: pid {proc.pid} listening on {address} (resident {rss})")
        return address, proc

    @staticmethod
    def _rss(pid: int) -> str:
        try:
            return f"{psutil.Process(pid).memory_info().rss / 1024**2:.0f} MiB"
        except psutil.Error:
            return "unknown"

    async def ask(self, address: str) -> str:
        """One request to a backend: a line out, a line back."""
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"hello\n")
            await writer.drain()
            return (await reader.readline()).decode().strip()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def use(self, sup: Supervisor, model: str) -> None:
        async with sup.acquire(model, self.start) as backend:
            reply = await self.ask(backend.address)
            self.say(f"{model} answered: {reply!r}")

    # -- scripted memory --------------------------------------------------------------------

    def _alive(self) -> list[int]:
        alive = []
        for _, _, process in list(self.children):
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process.pid)
        return alive

    def reading(self) -> MemoryReading:
        """What the scripted probe reports (called in a worker thread on every read)."""
        holders = {pid: PRETEND_PER_BACKEND for pid in self._alive()}
        used = PRETEND_BASE + sum(holders.values()) + self.other_program
        device = DeviceMemory(
            index=0,
            name="pretend GPU (scripted)",
            total=PRETEND_TOTAL,
            used=min(used, PRETEND_TOTAL),
            kind="gpu",
            processes=holders,
        )
        return MemoryReading(devices=(device,))

    def pretend_usage(self) -> str:
        device = self.reading().devices[0]
        used, total = device.used / gib(1), device.total / gib(1)
        return f"{used:.0f} of {total:.0f} GiB ({device.fraction:.0%})"

    # -- evictions --------------------------------------------------------------------------

    async def watch(self, stream: EventStream) -> None:
        async for eviction in stream:
            self.seen.append(eviction)
            outcome = "stopped" if eviction.ok else f"NOT stopped ({eviction.error!r})"
            self.say(
                f"EVICTION reason={eviction.reason.value}: {eviction.model} at "
                f"{eviction.address}, {outcome} in {eviction.duration * 1000:.0f} ms"
            )
            arrived, self._arrived = self._arrived, anyio.Event()
            arrived.set()

    async def expect(self, model: str, reason: EvictionReason) -> bool:
        """Wait (bounded) until an eviction of ``model`` for ``reason`` has been seen."""
        with anyio.move_on_after(EXPECT_WITHIN):
            while not any(e.model == model and e.reason is reason for e in self.seen):
                await self._arrived.wait()
            return True
        self.fail(f"expected a {reason.value} eviction of {model} within {EXPECT_WITHIN} s")
        return False

    # -- the scenario -----------------------------------------------------------------------

    async def run(self) -> int:
        settings = ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
        self.say("watchdog_async demo: real backend processes on 127.0.0.1, real time")
        self.say(f"Supervisor({settings})")
        self.say(
            "memory readings are SCRIPTED (ScriptedProbe), not measured: a pretend 16 GiB GPU "
            "where each live backend process holds 3 GiB"
        )
        probe = ScriptedProbe(self.reading)
        try:
            # the watcher outlives the supervisor: it prints the evictions of closing too
            async with (
                anyio.create_task_group() as tg,
                Supervisor(memory_probe=probe, **SETTINGS) as sup,
            ):
                tg.start_soon(self.watch, sup.events())
                await self._scenes(sup)
                self.scene("closing the supervisor: it stops what is still loaded")
        finally:
            await self._reap()
        return self._verdict()

    async def _scenes(self, sup: Supervisor) -> None:
        self.scene("1. LRU: max_loaded=2, three models asked for")
        await self.use(sup, "alpha")
        await self.use(sup, "beta")
        self.say("gamma asked for: 2 loaded already, the least recently used (alpha) must go")
        await self.use(sup, "gamma")
        await self.expect("alpha", EvictionReason.LRU)

        self.scene("2. idle unload: nobody calls beta or gamma any more")
        sup.configure(idle_timeout=IDLE_TIMEOUT)
        self.say(f"sup.configure(idle_timeout={IDLE_TIMEOUT}) (live)")
        await self.expect("beta", EvictionReason.IDLE_TIMEOUT)
        await self.expect("gamma", EvictionReason.IDLE_TIMEOUT)
        sup.configure(idle_timeout=None)
        self.say("sup.configure(idle_timeout=None): idle unloads off again for the next scenes")

        self.scene("3. hung backend: stuck takes a request and never answers")
        try:
            with anyio.fail_after(EXPECT_WITHIN + SETTINGS["busy_timeout"]):
                async with sup.acquire("stuck", self.start) as backend:
                    self.say(
                        f"request sent to stuck; busy with no progress for busy_timeout="
                        f"{SETTINGS['busy_timeout']} s means hung: the supervisor cancels the "
                        "call and stops the process"
                    )
                    reply = await self.ask(backend.address)
            self.fail(f"stuck answered {reply!r}: it was supposed to hang")
        except BackendStoppedError as exc:
            self.say(f"the caller failed with BackendStoppedError: {exc}")
        except TimeoutError:
            self.fail("the caller of stuck was never failed")
        await self.expect("stuck", EvictionReason.BUSY_TIMEOUT)

        self.scene("4. memory: pressure from the SCRIPTED probe (no real memory is used)")
        await self.use(sup, "delta")
        await self.use(sup, "epsilon")
        self.say(
            f"pretend usage {self.pretend_usage()}; memory_threshold={MEMORY_THRESHOLD:.0%}, "
            f"checked every {SETTINGS['check_interval']} s"
        )
        self.other_program = PRETEND_OTHER_PROGRAM
        self.say(
            f"scripted: another program takes {PRETEND_OTHER_PROGRAM / gib(1):.0f} GiB -> "
            f"pretend usage {self.pretend_usage()}, over the threshold"
        )
        self.say(
            "the reclaimer evicts idle backends holding memory on that device, least recently "
            "used first, until usage is back under the target"
        )
        if await self.expect("delta", EvictionReason.MEMORY):
            self.say(f"pretend usage back to {self.pretend_usage()}")

    async def _reap(self) -> None:
        """Collect every child's exit status; kill (and report) any still running."""
        for model, proc, _ in self.children:
            with anyio.move_on_after(SETTINGS["stop_timeout"] * 2):
                await proc.wait()
                continue
            self.fail(f"{model} (pid {proc.pid}) was still running at the end: killed")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()

    def _verdict(self) -> int:
        reasons = [e.reason.value for e in self.seen]
        self._out("")
        self.say("evictions seen, in order: " + ", ".join(reasons))
        for reason in ("lru", "idle_timeout", "busy_timeout", "memory"):
            if reason not in reasons:
                self.fail(f"no {reason} eviction happened")
        if not self._alive():
            self.say(f"all {len(self.children)} backend processes have exited")
        else:
            self.fail(f"processes still running: {self._alive()}")
        if self.problems:
            self.say(f"demo FAILED: {len(self.problems)} problem(s)")
            return 1
        self.say("demo finished: every expected eviction happened")
        return 0


async def run_demo(out: Callable[[str], None] = print) -> int:
    """Run the demo scenario, narrating through ``out``; return the exit status."""
    return await _Demo(out).run()


def _line(text: str) -> None:
    print(text, flush=True)


def _run(args: argparse.Namespace) -> int:
    try:
        return anyio.run(run_demo, _line)
    except KeyboardInterrupt:  # the supervisor has stopped its backends on the way out
        print("demo interrupted", file=sys.stderr)
        return 130


def add_demo_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the command line's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="watch the supervisor evict real backend processes (a few seconds)",
        description=(
            "Start small backend processes on 127.0.0.1 and narrate an LRU eviction, idle "
            "unloads, a hung backend stopped and a memory eviction (memory readings scripted)."
        ),
    )
    parser.set_defaults(handler=_run)
