"""FastAPI (and Starlette) integration: a lifespan that runs a Supervisor, a dependency that
gives it to endpoints, a streaming response that holds a backend busy until its last chunk, and
exception handlers that answer the supervisor's errors with 503. Needs the ``fastapi`` extra.

Usage::

    from fastapi import FastAPI
    from watchdog_async.fastapi import (
        BusyStreamingResponse, SupervisorDep, add_exception_handlers, supervisor_lifespan,
    )

    app = FastAPI(lifespan=supervisor_lifespan(max_loaded=2, idle_timeout="15m"))
    add_exception_handlers(app)  # BackendBusyError, CapacityError... -> 503 + Retry-After

    @app.post("/complete")
    async def complete(body: Body, sup: SupervisorDep) -> BusyStreamingResponse:
        async def tokens() -> AsyncIterator[bytes]:
            async with sup.acquire(body.model, start) as backend:  # busy from here...
                yield b""  # acquired: send the headers now
                async for token in generate(backend.address, body.prompt):
                    yield token
            # ...to here, after the last chunk
        return BusyStreamingResponse(tokens(), media_type="text/plain")

Your own lifespan composes: ``supervisor_lifespan(my_lifespan, max_loaded=2)`` starts the
supervisor first, then runs ``my_lifespan(app)`` inside it (so it can register pinned backends
through ``app.state.supervisor``), and closes the supervisor after it, stopping every backend
(``stop_on_exit``). Pass ``supervisor=`` a zero-argument factory (e.g.
``lambda: Supervisor.from_env()``) or a Supervisor instead of settings.

Streaming: enter ``busy()`` / ``acquire()`` *inside* the response's body generator, so entering
and leaving happen in the task that streams and the backend stays busy until the last chunk. Do
not hold it in a dependency with ``yield``: FastAPI 0.106-0.117 ran the code after ``yield``
before a streaming response had finished, releasing the backend too early (llama-cpp-python
#1861); entering in the endpoint and leaving in the generator crosses tasks, and a forced stop
(a hung backend) would then cancel the wrong task. :class:`BusyStreamingResponse` runs the
whole generator in one task and sends the headers only after its first chunk, so an error met
while acquiring (a full wait queue, no room) is still a clean 503, not a broken 200.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar, overload

import anyio
from fastapi import Depends
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ._errors import (
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    SupervisorClosedError,
    UnknownBackendError,
)
from ._http import http_error
from ._supervisor import Supervisor

__all__ = (
    "STATE_ATTRIBUTE",
    "BusyStreamingResponse",
    "SupervisorDep",
    "add_exception_handlers",
    "error_response",
    "get_supervisor",
    "supervisor_lifespan",
)

STATE_ATTRIBUTE = "supervisor"
"""The running supervisor is ``app.state.supervisor``."""

AppT = TypeVar("AppT", bound=Starlette)
UserLifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]
SupervisorSource = Supervisor | Callable[[], Supervisor]
Chunk = str | bytes | memoryview


@overload
def supervisor_lifespan(
    lifespan: None = None, *, supervisor: SupervisorSource | None = None, **settings: Any
) -> Callable[[Starlette], AbstractAsyncContextManager[Any]]: ...


@overload
def supervisor_lifespan(
    lifespan: UserLifespan[AppT], *, supervisor: SupervisorSource | None = None, **settings: Any
) -> Callable[[AppT], AbstractAsyncContextManager[Any]]: ...


def supervisor_lifespan(
    lifespan: UserLifespan[Any] | None = None,
    *,
    supervisor: SupervisorSource | None = None,
    **settings: Any,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A lifespan (``FastAPI(lifespan=...)``) that runs a Supervisor for the app's lifetime and
    stores it as ``app.state.supervisor``, wrapping ``lifespan`` (your own, optional).

    ``settings`` are the :class:`Supervisor` keywords (``max_loaded=2``, ``shutdown=...``,
    ``memory_probe=...``); a new supervisor is made each time the lifespan runs. Or pass
    ``supervisor=`` a factory called each time, or one Supervisor (which runs once only).
    Whatever ``lifespan`` yields (a state mapping or None) is passed through unchanged.
    """
    if supervisor is not None and settings:
        raise ConfigError("pass either supervisor= or settings, not both")
    if not (supervisor is None or isinstance(supervisor, Supervisor) or callable(supervisor)):
        raise ConfigError(f"supervisor must be a Supervisor or a factory, got {supervisor!r}")
    if lifespan is not None and not callable(lifespan):
        raise ConfigError(f"lifespan must be a callable taking the app, got {lifespan!r}")
    if supervisor is None:
        Supervisor(**settings)  # validate now: a bad setting fails at import, not at startup

    def make() -> Supervisor:
        if isinstance(supervisor, Supervisor):
            return supervisor
        if supervisor is not None:
            made = supervisor()
            if not isinstance(made, Supervisor):
                raise ConfigError(f"the supervisor factory returned {made!r}, not a Supervisor")
            return made
        return Supervisor(**settings)

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        async with make() as sup:
            setattr(app.state, STATE_ATTRIBUTE, sup)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state

    return run


def get_supervisor(connection: HTTPConnection) -> Supervisor:
    """The app's supervisor (a FastAPI dependency: ``sup: SupervisorDep``, or
    ``Depends(get_supervisor)``). Works for HTTP requests and websockets."""
    sup = getattr(connection.app.state, STATE_ATTRIBUTE, None)
    if not isinstance(sup, Supervisor):
        raise RuntimeError(
            "no supervisor on app.state: create the app with "
            "FastAPI(lifespan=supervisor_lifespan(...))"
        )
    return sup


SupervisorDep = Annotated[Supervisor, Depends(get_supervisor)]
"""``sup: SupervisorDep`` in an endpoint's parameters gives the app's supervisor."""


def error_response(exc: BaseException, *, retry_after: int = 1) -> Response | None:
    """The HTTP answer to one of the supervisor\'s errors (see README\'s table), or None for
    any other exception."""
    answer = http_error(exc, retry_after=retry_after)
    if answer is None:
        return None
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def add_exception_handlers(app: Starlette, *, retry_after: int = 1) -> None:
    """Answer the supervisor's errors raised by endpoints as :func:`error_response` says
    (503 + ``Retry-After`` for busy, no room, stopped; 404 for an unknown backend)."""

    async def handle(request: Request, exc: Exception) -> Response:
        response = error_response(exc, retry_after=retry_after)
        if response is None:  # a WatchdogError with no HTTP meaning (ConfigError...)
            raise exc
        return response

    for cls in (
        BackendBusyError,
        CapacityError,
        BackendStoppedError,
        SupervisorClosedError,
        UnknownBackendError,
    ):
        app.add_exception_handler(cls, handle)


class BusyStreamingResponse(StreamingResponse):
    """A streaming response whose body generator runs wholly in one task, and whose status is
    decided by the generator's first step.

    The first chunk is pulled before the headers are sent: if the generator raises there (a
    :class:`BackendBusyError` from ``busy()`` / ``acquire()``, a :class:`CapacityError`...),
    ``on_error(exc)`` gives the response to send instead (default :func:`error_response`:
    503 + ``Retry-After``; an exception it does not know propagates). Yield ``b""`` right
    after acquiring to send the headers before the first real chunk.

    Every later chunk is pulled in the same task, so a ``busy()`` entered in the generator is
    left there too, after the last chunk; a client that goes away cancels the generator, which
    leaves ``busy()`` at once; the generator is closed in that task whatever happens.
    """

    def __init__(
        self,
        content: AsyncIterable[Chunk],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        *,
        on_error: Callable[[Exception], Response | None] = error_response,
    ) -> None:
        if not isinstance(content, AsyncIterable):
            raise TypeError("BusyStreamingResponse needs an async iterable (an async generator)")
        super().__init__(content, status_code, headers, media_type, background)
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        iterator = aiter(self.body_iterator)
        try:
            spec = scope.get("asgi", {}).get("spec_version", "2.0")
            if tuple(map(int, spec.split("."))) >= (2, 4):
                try:
                    await self._respond(iterator, scope, receive, send)
                except OSError:  # the client went away (as Starlette does)
                    raise ClientDisconnect() from None
            else:
                await self._respond_watching(iterator, scope, receive, send)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if self.background is not None:
            await self.background()

    async def _respond_watching(
        self, iterator: AsyncIterator[Chunk], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Respond in this task while a child task watches for the client going away (which
        also ends a wait for the first chunk: a caller waiting in a backend's queue)."""
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._respond(iterator, scope, receive, send)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the body's own error, not a group of one
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _respond(
        self, iterator: AsyncIterator[Chunk], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            first: Chunk | None = await anext(iterator)
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            response = self.on_error(exc)
            if response is None:
                raise
            await response(scope, receive, send)
            return
        await self._send_all(first, iterator, send)

    async def _send_all(
        self, first: Chunk | None, iterator: AsyncIterator[Chunk], send: Send
    ) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if first is not None:
            body = self._bytes(first)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            async for chunk in iterator:
                body = self._bytes(chunk)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _bytes(self, chunk: Chunk) -> bytes:
        return chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
