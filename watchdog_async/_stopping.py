"""Stopping one backend: its shutdown callback, then SIGTERM, a grace period, SIGKILL, confirmation.

This is the I/O edge behind "Stopping a backend" in the design. The backend itself is opaque
here; what it stops is processes:

- :class:`ProcessRef` is a process as registered: its pid and the create time read at
  registration, so that a pid the kernel has since handed to another process is never signalled.
- :func:`stop_tree` stops the registered process and all its descendants and says whether every
  one of them is confirmed gone.
- :func:`stop_backend` is the whole stop of one backend: its shutdown callback bounded by the stop
  timeout, then :func:`stop_tree`.
- :func:`tree_pids` lists a registered process's tree (for per-process memory attribution).

Rules kept here:

- The tree is snapshotted first (the process and ``children(recursive=True)``); only members of
  that snapshot, and descendants of its still-alive members found just before SIGKILL, are ever
  signalled. Nothing is looked up by name and no shell is used. This process itself is never
  part of a tree.
- Signals go through :class:`psutil.Process`, which refuses a pid that was reused since the
  process object was made.
- Nothing is reaped: no ``os.waitpid``, no ``psutil.Process.wait`` or ``psutil.wait_procs``
  (they reap children of this process). "Gone" is observed by polling; a zombie counts as gone,
  and the process's owner (say the ``subprocess.Popen`` that started it) collects its exit status.
- Every wait is an ``anyio.sleep`` checkpoint, so a stop can be cancelled at any wait. The step
  that freezes the survivors (``SIGSTOP``), collects their late children and sends SIGKILL runs as
  one call in a worker thread, so a cancellation never leaves a process frozen.

Windows: ``terminate()`` and ``kill()`` both end a process with ``TerminateProcess`` (there is no
graceful signal), and there are no process groups to signal; the tree walk over parent pids is
what finds the descendants, exactly as on POSIX.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import psutil
from loguru import logger

from ._errors import ConfigError

__all__ = ("ProcessRef", "TreeStopResult", "stop_backend", "stop_tree", "tree_pids")

_B = TypeVar("_B")

# A reference built by hand (not by ``resolve``) compares wall-clock create times. psutil derives
# them from the boot time, which moves by whole seconds when the system clock is adjusted, so allow
# that much. A reused pid belongs to a process started after the registered one died.
_CREATE_TIME_SLACK = 2.0

_POLL_FIRST = 0.005  # seconds between the first checks for a process to be gone
_POLL_MAX = 0.05  # the interval doubles up to this

# Rounds of "freeze the survivors, collect their new descendants" before SIGKILL. Each round
# freezes the processes found in the round before, so a tree that keeps forking is exhausted
# quickly; the bound only guards against a pathological one.
_FREEZE_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A registered process: pid + create time recorded at registration (pid-reuse guard).

    Build one with :meth:`resolve`. A reference made by :meth:`resolve` also keeps psutil's own
    identity of the process, which on Linux, macOS and NetBSD rests on a start time that system
    clock changes do not move; a reference built by hand from ``(pid, create_time)`` compares
    wall-clock create times, allowing for the small shifts clock adjustments cause.
    """

    pid: int
    create_time: float
    _process: psutil.Process | None = field(default=None, repr=False, compare=False, kw_only=True)

    @classmethod
    def resolve(cls, process: object) -> ProcessRef:
        """Reference a live process given as an ``int`` pid or a process object.

        Accepted: an ``int`` pid, :class:`psutil.Process`, :class:`asyncio.subprocess.Process`,
        :class:`anyio.abc.Process` (what ``anyio.open_process`` returns) and
        :class:`subprocess.Popen`. The create time is read now.

        Raises :class:`~watchdog_async._errors.ConfigError` for any other type (``bool``
        included), a pid ``<= 0``, this process's own pid, a process object whose exit status was
        already collected, no process with that pid, or a create time that cannot be read (the
        pid could then not be guarded against reuse). A zombie whose create time can be read (as on
        Linux) is accepted: it exists, and a stop finds it already gone.
        """
        given: psutil.Process | None = None
        if isinstance(process, bool):
            raise ConfigError(f"process must be a pid or a process object, not {process!r}")
        if isinstance(process, int):
            pid = int(process)
        elif isinstance(process, psutil.Process):
            given = process
            pid = process.pid
        elif isinstance(process, subprocess.Popen | asyncio.subprocess.Process | anyio.abc.Process):
            if process.returncode is not None:
                raise ConfigError(
                    f"process {process.pid} has already exited "
                    f"(exit status {process.returncode} collected)"
                )
            pid = process.pid
        else:
            raise ConfigError(
                "process must be an int pid, psutil.Process, subprocess.Popen, "
                f"asyncio.subprocess.Process or anyio.abc.Process, not {type(process).__name__}"
            )
        if pid <= 0:
            raise ConfigError(f"process id must be positive, got {pid}")
        if pid == os.getpid():
            raise ConfigError(f"process {pid} is this process itself")
        try:
            proc = psutil.Process(pid) if given is None else given
            if not proc.is_running():
                raise psutil.NoSuchProcess(pid)
            create_time = proc.create_time()
        except psutil.ZombieProcess:
            raise ConfigError(f"process {pid} has already exited (a zombie)") from None
        except psutil.NoSuchProcess:
            raise ConfigError(f"no process with pid {pid}") from None
        except psutil.AccessDenied as exc:
            raise ConfigError(f"cannot read the create time of process {pid}: {exc}") from exc
        return cls(pid, create_time, _process=proc)

    def process(self) -> psutil.Process | None:
        """The :class:`psutil.Process` if the pid still names the registered process, else None.

        A zombie is still the registered process (its pid is not free until it is reaped).
        """
        proc = self._process
        try:
            if proc is None:
                proc = psutil.Process(self.pid)
                if abs(proc.create_time() - self.create_time) > _CREATE_TIME_SLACK:
                    return None
            elif not proc.is_running():
                return None
        except psutil.NoSuchProcess:
            return None
        except psutil.AccessDenied:
            return None  # its identity cannot be checked: treat it as not ours
        return proc

    def is_alive(self) -> bool:
        """Whether the registered process still runs: False if gone, a zombie, or pid reused.

        Synchronous and cheap (a couple of reads of ``/proc`` on Linux); fine in a worker thread.
        """
        proc = self.process()
        return proc is not None and not _is_gone(proc)


@dataclass(frozen=True, slots=True)
class TreeStopResult:
    """What :func:`stop_tree` did.

    ``gone``: every process of the tree is confirmed gone (a zombie counts as gone).
    ``error``: the first failure met (a ``PermissionError`` for a refused signal, a
    ``TimeoutError`` naming the pids that outlived SIGKILL), even when ``gone`` is true.
    ``signalled`` / ``killed``: the pids that were sent SIGTERM / SIGKILL.
    """

    gone: bool
    error: BaseException | None
    signalled: tuple[int, ...]
    killed: tuple[int, ...]


async def stop_tree(
    ref: ProcessRef, *, timeout: float, kill_wait: float | None = None
) -> TreeStopResult:
    """Stop the registered process and all its descendants; never reap any of them.

    If the registered process is no longer alive (gone, a zombie, or its pid reused) nothing is
    signalled and the tree counts as gone. Otherwise: snapshot the tree, send SIGTERM to every
    member, wait up to ``timeout`` seconds for all to be gone, then freeze the survivors, add the
    descendants they forked meanwhile, send SIGKILL to all of them and wait up to ``kill_wait``
    seconds (default: ``timeout``) for them to be gone.

    A refused signal (``PermissionError``) is recorded and the stop goes on with the other
    processes. Cancellation is honoured at every wait; processes already signalled stay signalled.
    """
    timeout = _check_duration("timeout", timeout)
    kill_wait = timeout if kill_wait is None else _check_duration("kill_wait", kill_wait)

    root = ref.process()
    if root is None or _is_gone(root):
        logger.debug("process {} is already gone; nothing to stop", ref.pid)
        return TreeStopResult(gone=True, error=None, signalled=(), killed=())

    errors: list[BaseException] = []
    tree = await anyio.to_thread.run_sync(_snapshot_tree, root, errors)
    logger.info(
        "stopping process {} and its tree {} (SIGTERM, {}s grace)",
        ref.pid,
        [p.pid for p in tree],
        timeout,
    )
    signalled = _send_each(tree, psutil.Process.terminate, "SIGTERM", errors)

    survivors = await _wait_gone(tree, timeout)
    killed: list[int] = []
    if survivors:
        doomed, killed = await anyio.to_thread.run_sync(_freeze_and_kill, survivors, tree, errors)
        logger.warning(
            "processes {} still alive {}s after SIGTERM; sent SIGKILL to {}",
            [p.pid for p in survivors],
            timeout,
            killed,
        )
        # Nothing that refused SIGKILL will die of it: wait only when some SIGKILL was sent.
        waited = kill_wait if killed else 0.0
        survivors = await _wait_gone(doomed, waited)
        if survivors:
            pids = [p.pid for p in survivors]
            errors.append(TimeoutError(f"processes {pids} still alive {waited}s after SIGKILL"))

    result = TreeStopResult(
        gone=not survivors,
        error=errors[0] if errors else None,
        signalled=tuple(signalled),
        killed=tuple(killed),
    )
    if result.gone:
        logger.info("process tree of {} is gone", ref.pid)
    else:
        logger.error("process tree of {} not stopped: {}", ref.pid, result.error)
    return result


async def stop_backend(
    backend: _B,
    process: ProcessRef | None,
    *,
    shutdown: Callable[[_B], Awaitable[object]] | None,
    stop_timeout: float,
) -> tuple[bool, BaseException | None]:
    """Stop one backend: ``shutdown(backend)`` bounded by ``stop_timeout``, then its process tree.

    Returns ``(ok, error)``. ``ok``: with a process, its whole tree is confirmed gone (even if the
    callback failed); with none, the callback returned without error (or there is none).
    ``error``: the first failure met (the callback's exception, a ``TimeoutError`` for a callback
    that overran, then :func:`stop_tree`'s error), even when ``ok`` is true. A failing callback
    never prevents the signals. The tree gets ``stop_timeout`` between SIGTERM and SIGKILL and as
    much again to be gone after SIGKILL, so the whole stop is bounded by about three times
    ``stop_timeout``.
    """
    stop_timeout = _check_duration("stop_timeout", stop_timeout)
    error = None if shutdown is None else await _run_shutdown(shutdown, backend, stop_timeout)
    if process is None:
        return error is None, error
    result = await stop_tree(process, timeout=stop_timeout)
    return result.gone, error if error is not None else result.error


async def _run_shutdown(
    shutdown: Callable[[_B], Awaitable[object]], backend: _B, stop_timeout: float
) -> BaseException | None:
    """Await the callback for at most ``stop_timeout`` seconds; return its failure, if any."""
    with anyio.move_on_after(stop_timeout) as scope:
        try:
            await shutdown(backend)
        except Exception as exc:  # any failure of user code is reported, never raised
            logger.opt(exception=exc).debug("shutdown callback for {!r} failed", backend)
            return exc
    if scope.cancelled_caught:
        logger.warning("shutdown callback for {!r} took longer than {}s", backend, stop_timeout)
        return TimeoutError(f"shutdown callback took longer than {stop_timeout}s")
    return None


def tree_pids(ref: ProcessRef) -> tuple[int, ...]:
    """Pids of the registered process and its live descendants, root first; () if it is gone.

    Blocking (it walks every process's parent pid): call it in a worker thread.
    """
    root = ref.process()
    if root is None or _is_gone(root):
        return ()
    return tuple(p.pid for p in _snapshot_tree(root, []))


def _check_duration(name: str, value: float) -> float:
    if math.isnan(value) or value < 0:
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _is_gone(proc: psutil.Process) -> bool:
    """True when the process has exited (a zombie included) or its pid was reused."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return True
    except psutil.AccessDenied:
        return False


def _snapshot_tree(root: psutil.Process, errors: list[BaseException]) -> list[psutil.Process]:
    """The root and its descendants still alive, root first. Blocking: run in a worker thread.

    On Linux ``children(recursive=True)`` reads every process's parent pid from ``/proc``.
    """
    members = [root]
    try:
        members.extend(root.children(recursive=True))
    except psutil.NoSuchProcess:
        pass  # the root exited; its children were re-parented and are out of reach
    except psutil.Error as exc:
        errors.append(exc)
        logger.warning("cannot list the descendants of process {}: {}", root.pid, exc)
    own = os.getpid()
    return [p for p in members if p.pid != own and not _is_gone(p)]


def _send_each(
    procs: Iterable[psutil.Process],
    send: Callable[[psutil.Process], None],
    what: str,
    errors: list[BaseException],
) -> list[int]:
    """Call ``send`` on each process; return the pids it succeeded for.

    A process that is gone (or whose pid was reused: psutil refuses to signal it) is skipped; a
    refusal becomes a ``PermissionError`` in ``errors``.
    """
    sent: list[int] = []
    for proc in procs:
        try:
            send(proc)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied as exc:
            error = PermissionError(errno.EPERM, f"not permitted to send {what} to {proc.pid}")
            error.__cause__ = exc
            errors.append(error)
            logger.warning("cannot send {} to process {}: {}", what, proc.pid, exc)
        except OSError as exc:
            errors.append(exc)
            logger.warning("cannot send {} to process {}: {}", what, proc.pid, exc)
        else:
            sent.append(proc.pid)
    return sent


def _freeze_and_kill(
    survivors: list[psutil.Process], tree: list[psutil.Process], errors: list[BaseException]
) -> tuple[list[psutil.Process], list[int]]:
    """Freeze the survivors and their new descendants, then SIGKILL them all. Blocking.

    Children forked during the grace period were never signalled; they are descendants of a
    registered process at stop time, so they go too. Freezing first (``SIGSTOP``; a suspend on
    Windows) keeps a process from forking between the listing of its children and its SIGKILL.
    Returns the processes sent SIGKILL (to wait for) and the pids that received it.
    """
    own = os.getpid()
    known = set(tree)
    doomed = list(survivors)
    frontier = list(survivors)
    for _ in range(_FREEZE_ROUNDS):
        _send_each(frontier, psutil.Process.suspend, "SIGSTOP", errors)
        found: list[psutil.Process] = []
        for proc in frontier:
            try:
                descendants = proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in descendants:
                if child.pid != own and child not in known:
                    known.add(child)
                    found.append(child)
        if not found:
            break
        logger.debug("processes {} were forked during the stop", [p.pid for p in found])
        doomed.extend(found)
        frontier = found
    killed = _send_each(doomed, psutil.Process.kill, "SIGKILL", errors)
    if len(killed) < len(doomed):
        # A process that was frozen but refused SIGKILL must not stay frozen.
        refused = [p for p in doomed if p.pid not in killed and not _is_gone(p)]
        _send_each(refused, psutil.Process.resume, "SIGCONT", [])
    return doomed, killed


async def _wait_gone(procs: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Poll until every process is gone or ``within`` seconds pass; return those still alive.

    Polls at a short, growing interval, never by waiting on the process (that would reap it).
    """
    alive = [p for p in procs if not _is_gone(p)]
    deadline = anyio.current_time() + within
    interval = _POLL_FIRST
    while alive:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            break
        await anyio.sleep(min(interval, remaining))
        interval = min(interval * 2, _POLL_MAX)
        alive = [p for p in alive if not _is_gone(p)]
    return alive
