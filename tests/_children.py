"""Child programs for tests that need real processes, and small helpers to drive them.

Each ``*_argv`` function returns the argv of a Python child (``sys.executable -c CODE``; no
shell). Children that install a signal handler print ``ready`` once it is in place, so a test
that reads that line knows a signal sent now meets the handler. Children that report pids print
them on one line, separated by spaces. Every child sleeps for a while at most and is meant to be
stopped by the test (or its teardown) long before.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import anyio.to_thread
import psutil

LIFETIME = 30.0  # seconds a child sleeps before leaving on its own: a bound, not a wait


def _argv(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def sleeper_argv() -> list[str]:
    """Sleeps; SIGTERM (default action) ends it. Prints ``ready``."""
    return _argv(f"""
        import time
        print("ready", flush=True)
        time.sleep({LIFETIME})
    """)


def exit_now_argv() -> list[str]:
    """Exits at once (with status 0)."""
    return _argv("pass")


def sigterm_deaf_argv() -> list[str]:
    """Ignores SIGTERM (``SIG_IGN``), prints ``ready``, sleeps: only SIGKILL ends it."""
    return _argv(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep({LIFETIME})
    """)


def parent_with_grandchild_argv(
    *, parent_deaf: bool = False, child_deaf: bool = False
) -> list[str]:
    """Starts a sleeping child, waits until it is ready, prints ``<own pid> <child pid>``, sleeps.

    ``parent_deaf`` / ``child_deaf``: that process ignores SIGTERM. The child sets its SIGTERM
    disposition itself, since an ignored signal stays ignored across exec.
    """
    child_code = textwrap.dedent(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.{"SIG_IGN" if child_deaf else "SIG_DFL"})
        print("ready", flush=True)
        time.sleep({LIFETIME})
    """)
    return _argv(f"""
        import os, signal, subprocess, sys, time
        if {parent_deaf}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}], stdout=subprocess.PIPE)
        child.stdout.readline()
        print(os.getpid(), child.pid, flush=True)
        time.sleep({LIFETIME})
    """)


def exits_after_sigterm_argv(delay: float) -> list[str]:
    """On SIGTERM, keeps running ``delay`` seconds, then exits by itself. Prints ``ready``."""
    return _argv(f"""
        import signal, sys, time
        def on_term(signum, frame):
            time.sleep({delay})
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep({LIFETIME})
    """)


def forks_on_sigterm_argv() -> list[str]:
    """On SIGTERM, starts a new sleeping child, prints its pid, and carries on (SIGTERM-deaf).

    Prints ``ready`` first. The new child's stdout is ``/dev/null``, so the parent's stdout reaches
    end-of-file as soon as the parent is gone.
    """
    return _argv(f"""
        import signal, subprocess, sys, time
        children = []
        def on_term(signum, frame):
            child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep({LIFETIME})"],
                stdout=subprocess.DEVNULL,
            )
            children.append(child)
            print(child.pid, flush=True)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        while True:
            time.sleep({LIFETIME})
    """)


def start(argv: list[str]) -> subprocess.Popen[str]:
    """Start a child with its stdout piped to the test (text mode); stdin is ``/dev/null``."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


async def read_line(proc: subprocess.Popen[str], within: float = 10.0) -> str:
    """The next line of the child's stdout, without its newline ("" at end of file).

    Reads in a worker thread, so the event loop keeps running; fails after ``within`` seconds
    (the abandoned read ends when the child is stopped and its stdout closes).
    """
    assert proc.stdout is not None
    with anyio.fail_after(within):
        line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    return line.rstrip("\n")


def is_gone(pid: int) -> bool:
    """True when no process has this pid, or only a zombie (it has exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
