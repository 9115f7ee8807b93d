"""Test doubles shared by the supervisor tests (fixtures built on them are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from watchdog_async import Backend, Supervisor

OpenSup = Callable[..., Coroutine[Any, Any, Supervisor]]
"""The ``open_sup`` fixture: ``await open_sup(**settings)`` opens a supervisor for the test."""


class Recorder:
    """A shutdown callback that records what it was asked to stop. ``gate`` holds stops open
    until set; ``error`` is raised by every stop; ``hang`` makes stops never return."""

    def __init__(self) -> None:
        self.stopped: list[str] = []
        self.gate: anyio.Event | None = None
        self.error: BaseException | None = None
        self.hang = False

    async def __call__(self, backend: Backend) -> None:
        self.stopped.append(backend.address)
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await anyio.sleep_forever()
        if self.error is not None:
            raise self.error
