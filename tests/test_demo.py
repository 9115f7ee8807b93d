"""``python -m watchdog_async demo``, run for real: it starts real backend processes, narrates an
LRU eviction, idle unloads, a hung backend stopped and a memory eviction (scripted memory), exits 0
and leaves no process behind. The pytest timeout is the demo's time limit (30 s)."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil
import pytest

from watchdog_async._demo import run_demo

REASONS = ("lru", "idle_timeout", "busy_timeout", "memory")
TIME_LIMIT = 30  # seconds: what the demo promises


def backend_pids(output: str) -> list[int]:
    """The pids of the backend processes the demo says it started."""
    return [int(pid) for pid in re.findall(r": pid (\d+) listening on", output)]


def still_running(pid: int) -> bool:
    """A demo backend with this pid is still running (a reused pid running something else is
    not one: the demo's backends serve a loopback socket from ``-c`` code)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return "create_server" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def check_narration(output: str) -> None:
    for reason in REASONS:
        assert f"EVICTION reason={reason}:" in output, f"no {reason} eviction narrated"
    assert "the caller failed with BackendStoppedError" in output
    assert "SCRIPTED" in output  # the memory pressure is said to be scripted, plainly
    assert "PROBLEM" not in output
    stamped = [line for line in output.splitlines() if line]
    assert all(re.match(r"\[ *\d+\.\d\ds\] ", line) for line in stamped), output
    pids = backend_pids(output)
    assert len(pids) == 6  # alpha, beta, gamma, stuck, delta, epsilon
    assert not [pid for pid in pids if still_running(pid)]


@pytest.mark.timeout(TIME_LIMIT)
def test_demo_command_runs_to_completion() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "watchdog_async", "demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check_narration(done.stdout)
    assert done.stderr == ""  # the library's log stays off without -v


@pytest.mark.timeout(TIME_LIMIT)
async def test_demo_in_process_leaves_no_child() -> None:
    """The same scenario in this process: the backends are this process's children, so the
    conftest fixture sees any left running."""
    lines: list[str] = []
    status = await run_demo(lines.append)
    output = "\n".join(lines)
    assert status == 0, output
    check_narration(output)


def test_demo_is_listed_in_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "watchdog_async", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in done.stdout
    assert "probe" in done.stdout
