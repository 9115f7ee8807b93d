"""Shared helpers for the benchmark scripts: arguments, interleaved best-of-N timing, results.

Every script measures its variants side by side in one process, interleaved round by round (the
order rotates each round), with the garbage collector paused during timed sections, and reports
the best round: on a shared, noisy machine the fastest round is the one least disturbed.

Each script prints human-readable lines, one per figure value, with its target::

    [1] sequential: ours / port            1.18x   target <= 1.25x   ok

and, with ``--json PATH``, writes its rows there for ``run_all.py``'s summary table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Protocol

__all__ = (
    "Row",
    "finish",
    "gc_paused",
    "interleaved",
    "machine",
    "median",
    "parse_args",
    "percentile",
    "info",
    "show",
)


@dataclass(frozen=True)
class Row:
    """One reported value: ``ok`` is None for a value with no target (context only)."""

    figure: str
    metric: str
    value: float
    unit: str
    target: str
    ok: bool | None
    note: str = ""

    def formatted_value(self) -> str:
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "B":
            return f"{self.value:,.0f} B"
        if self.unit in ("us", "µs"):
            return f"{self.value:.2f} µs"
        if self.unit == "ms":
            return f"{self.value:.2f} ms"
        return f"{self.value:g} {self.unit}"

    @property
    def status(self) -> str:
        return "-" if self.ok is None else ("ok" if self.ok else "MISS")


def parse_args(
    description: str | None, argv: Sequence[str] | None = None, *, clock: bool = False
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script runs, not its numbers"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per variant (best kept)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
    if clock:
        parser.add_argument(
            "--clock",
            choices=("cpu", "wall"),
            default="cpu",
            help="cpu: the event-loop thread's CPU time (default); wall: perf_counter",
        )
    return parser.parse_args(argv)


def machine() -> str:
    """A one-line description of where the numbers come from."""
    cores = os.cpu_count() or 0
    return (
        f"{cores} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic garbage collector off for a timed section."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def interleaved(
    variants: Mapping[str, Callable[[], Awaitable[float]]],
    rounds: int,
    *,
    between: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order each round; each call returns
    the figure it measured (seconds per operation, say). Returns every round's figure per
    variant; callers usually keep ``min`` (best of N)."""
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if between is not None:
                await between()
            results[name].append(await variants[name]())
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank on the sorted values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def show(row: Row) -> Row:
    """Print one row, aligned, and return it."""
    target = f"target {row.target}" if row.target else ""
    line = (
        f"[{row.figure}] {row.metric:<48} {row.formatted_value():>14}   {target:<26} {row.status}"
    )
    if row.note:
        line += f"  ({row.note})"
    print(line, flush=True)
    return row


def info(figure: str, metric: str, value: float, unit: str, note: str = "") -> Row:
    """Print a value shown for context (no target); it is not part of the summary."""
    return show(Row(figure, metric, value, unit, "", None, note))


def finish(rows: Sequence[Row], args: argparse.Namespace, started: float) -> None:
    """Print the footer and write the rows for run_all.py."""
    print(f"({machine()}; {time.perf_counter() - started:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(row) for row in rows], out)


class AsyncCM(Protocol):
    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...


Make = Callable[[str], AsyncCM]


class Null:
    """The floor: an async context manager that does nothing (built per call, like the rest)."""

    __slots__ = ("_address",)

    def __init__(self, address: str) -> None:
        self._address = address

    async def __aenter__(self) -> Null:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
