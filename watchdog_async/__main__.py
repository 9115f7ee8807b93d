"""Command line: ``python -m watchdog_async probe [--json]`` and ``python -m watchdog_async demo``.

``probe`` shows what the memory reclaimer sees: the probe chosen automatically, then every
device with its usage and, where known, the memory of each process on it. ``demo`` runs a
narrated scenario with real backend processes (see :mod:`watchdog_async._demo`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger

from . import _memory
from ._demo import add_demo_command

_GIB = 1024**3
_MIB = 1024**2

_Subparsers = argparse._SubParsersAction  # the type of ArgumentParser.add_subparsers()


def _add_probe(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="show the memory the reclaimer sees",
        description="Read memory once with the automatically chosen probe and print it.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_probe)


# Subcommands: each function adds one parser to the subparsers and sets `handler`, a
# (argparse.Namespace) -> int exit status. A new command (e.g. `demo`) is one more entry here.
_COMMANDS: tuple[Callable[[_Subparsers[argparse.ArgumentParser]], None], ...] = (
    _add_probe,
    add_demo_command,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m watchdog_async",
        description="Tools for the watchdog_async supervisor.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's debug log on stderr"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    if args.verbose:
        logger.enable("watchdog_async")
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _run_probe(args: argparse.Namespace) -> int:
    probe = _memory.default_probe()
    description = str(getattr(probe, "description", type(probe).__name__))
    try:
        reading = probe.read()
    except Exception as exc:
        print(f"probe: {description}", file=sys.stderr)
        print(f"reading failed: {exc!r}", file=sys.stderr)
        return 1
    finally:
        close = getattr(probe, "close", None)
        if callable(close):
            close()
    problem = _memory.check_reading(reading)
    if args.json:
        print(json.dumps(_as_json(description, reading, problem), indent=2))
    else:
        print(_as_text(description, reading))
    if problem is not None:
        print(f"the reclaimer would skip this reading: {problem}", file=sys.stderr)
        return 1
    return 0


def _as_json(description: str, reading: _memory.MemoryReading, problem: str | None) -> Any:
    devices = [
        {
            "index": device.index,
            "name": device.name,
            "kind": device.kind,
            "total": device.total,
            "used": device.used,
            "fraction": device.fraction,
            "processes": None
            if device.processes is None
            else {str(pid): size for pid, size in _by_size(device.processes)},
        }
        for device in reading.devices
    ]
    return {"probe": description, "devices": devices, "problem": problem}


def _as_text(description: str, reading: _memory.MemoryReading) -> str:
    lines = [f"probe: {description}"]
    if not reading.devices:
        lines.append("no devices")
    for device in reading.devices:
        lines.append(
            f"device {device.index}: {device.name} ({device.kind}): "
            f"{device.used / _GIB:.2f} / {device.total / _GIB:.2f} GiB used "
            f"({device.fraction * 100:.1f}%)"
        )
        if device.processes is None:
            if device.kind != "ram":  # RAM probes never attribute memory to processes
                lines.append("  processes: unknown")
        elif not device.processes:
            lines.append("  processes: none")
        for pid, size in _by_size(device.processes or {}):
            lines.append(f"  pid {pid}: {size / _MIB:.1f} MiB")
    return "\n".join(lines)


def _by_size(processes: Mapping[int, int]) -> list[tuple[int, int]]:
    return sorted(processes.items(), key=lambda item: (-item[1], item[0]))


if __name__ == "__main__":
    raise SystemExit(main())
