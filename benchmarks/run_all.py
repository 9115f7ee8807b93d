"""Run every benchmark script in order, each in its own process, then print a summary table.

``python benchmarks/run_all.py [--quick] [--only NAME ...] [--strict]``

Each script's own output streams through as it runs. The table lists every figure that has a
target, with the value measured here and ok / MISS. The exit status is non-zero when a script
fails, or, with ``--strict``, when a target is missed (by default a miss is reported, not an
error: the numbers depend on the machine; BENCHMARKS.md explains each miss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, machine

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "bench_busy.py",
    "bench_growth.py",
    "bench_lag.py",
    "bench_reaction.py",
    "bench_memory.py",
)


def run_script(script: str, quick: bool) -> tuple[int, list[Row], float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, str(HERE / script), "--json", str(out)]
        if quick:
            command.append("--quick")
        began = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        elapsed = time.perf_counter() - began
        rows = [Row(**row) for row in json.loads(out.read_text())] if out.exists() else []
    return code, rows, elapsed


def table(rows: list[Row]) -> str:
    header = ("Figure", "Measure", "Value", "Target", "Status")
    lines = [
        (row.figure, row.metric, row.formatted_value(), row.target, row.status)
        for row in rows
        if row.ok is not None
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark and summarise.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", metavar="SCRIPT", help="run only these scripts")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    scripts: tuple[str, ...] = SCRIPTS
    if args.only:
        unknown = set(args.only) - set(SCRIPTS)
        if unknown:
            parser.error(f"unknown script(s): {', '.join(sorted(unknown))}")
        scripts = tuple(s for s in SCRIPTS if s in args.only)

    began = time.perf_counter()
    rows: list[Row] = []
    failed: list[str] = []
    for script in scripts:
        print(f"\n=== {script} ===", flush=True)
        code, script_rows, elapsed = run_script(script, args.quick)
        print(f"=== {script}: exit {code} in {elapsed:.1f} s ===", flush=True)
        if code != 0:
            failed.append(script)
        rows += script_rows

    print(
        f"\nSummary ({machine()}; {time.perf_counter() - began:.0f} s in all"
        f"{'; --quick: sizes too small for meaningful numbers' if args.quick else ''})"
    )
    print(table(rows))
    targets = [row for row in rows if row.ok is not None]
    missed = [row for row in targets if not row.ok]
    print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met", end="")
    print(f"; missed: {', '.join(f'[{r.figure}] {r.metric}' for r in missed)}" if missed else "")
    if failed:
        print(f"FAILED scripts: {', '.join(failed)}")
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
