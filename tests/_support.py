"""Test doubles shared by the supervisor tests (fixtures built on them are in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn

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


@asynccontextmanager
async def uvicorn_serving(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free loopback port (lifespan on); yield its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none")
    )
    ended = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(10):
            while not server.started:  # uvicorn has no event for this
                if ended.is_set():
                    raise RuntimeError("uvicorn did not start")
                await anyio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
