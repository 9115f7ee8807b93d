"""Smoke test of benchmarks/: every script runs to the end in its tiny ``--quick`` mode and
prints its ratio lines next to their targets. No timing is asserted (numbers from --quick
sizes mean nothing); the benchmarks themselves run with ``nox -s bench``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# each script and the figure lines (with a target) it must print
EXPECTED = {
    "bench_busy.py": [
        "sequential: ours / port",
        "yielding body: ours / port",
        "tasks: ours / port",
    ],
    "bench_growth.py": ["check() growth", "make_room() growth"],
    "bench_lag.py": ["p99 lateness added by the supervisor"],
    "bench_reaction.py": [
        "idle deadline -> stop starting",
        "busy deadline -> callers failing",
        "memory over threshold -> at target",
    ],
    "bench_memory.py": ["per backend, registered", "per backend, after one call each"],
}
# "[fig] metric   value   target <= ...   ok|MISS"
TARGET_LINE = re.compile(r"^\[\d\] (?P<metric>.+?)\s{2,}\S.*\btarget (<=|>=) .*\s(ok|MISS)\b")


def _run(*args: str, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS.parent,
        env=env,
        check=False,
    )


def test_every_script_is_covered() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_script_runs_quick_and_prints_its_ratios(script: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    result = _run(str(BENCHMARKS / script), "--quick", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    printed = [m["metric"] for m in map(TARGET_LINE.match, result.stdout.splitlines()) if m]
    for metric in EXPECTED[script]:
        assert any(metric in line for line in printed), (metric, result.stdout)
    rows = json.loads(out.read_text())
    assert rows, "no rows written"
    for row in rows:
        assert set(row) >= {"figure", "metric", "value", "unit", "target", "ok"}
        assert isinstance(row["value"], float | int)
        assert row["ok"] in (True, False)  # every written row has a target


def test_run_all_prints_a_summary_table() -> None:
    result = _run(str(BENCHMARKS / "run_all.py"), "--quick", "--only", "bench_memory.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "=== bench_memory.py: exit 0" in out
    table = out[out.index("Summary") :]
    assert re.search(r"Figure\s+Measure\s+Value\s+Target\s+Status", table)
    assert re.search(r"^5\s+per backend, registered .*<= 2,048 B\s+(ok|MISS)", table, re.M)
    assert re.search(r"\d+ of \d+ targets met", table)


def test_run_all_rejects_an_unknown_script() -> None:
    result = _run(str(BENCHMARKS / "run_all.py"), "--only", "bench_nothing.py")
    assert result.returncode == 2
    assert "unknown script" in result.stderr
