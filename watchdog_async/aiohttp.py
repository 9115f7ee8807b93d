"""aiohttp integration: run a Supervisor for the application's lifetime, find it from a
request, and answer the supervisor's errors with 503. Needs the ``aiohttp`` extra.

Usage::

    from aiohttp import web
    from watchdog_async.aiohttp import error_middleware, get_supervisor, setup

    app = web.Application(middlewares=[error_middleware()])  # busy, no room... -> 503
    setup(app, max_loaded=2, idle_timeout="15m")  # or setup(app, supervisor=Supervisor(...))

    async def complete(request: web.Request) -> web.StreamResponse:
        sup = get_supervisor(request)
        body = await request.json()
        response = web.StreamResponse()
        async with sup.acquire(body["model"], start) as backend:  # busy from here...
            await response.prepare(request)  # after acquiring: errors above are a clean 503
            async for token in generate(backend.address, body["prompt"]):
                await response.write(token)
            await response.write_eof()
        return response  # ...to here, after the last chunk

A handler runs in one task from start to end, so ``busy()`` / ``acquire()`` around the writes
holds the backend busy until the last chunk with no special care. The supervisor starts in the
app's startup (``cleanup_ctx``) and closes in its cleanup, stopping every backend
(``stop_on_exit``). Sub-applications find it too (``request.config_dict``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ._errors import (
    ConfigError,
    WatchdogError,
)
from ._http import http_error
from ._supervisor import Supervisor

__all__ = ("SUPERVISOR_KEY", "error_middleware", "error_response", "get_supervisor", "setup")

SUPERVISOR_KEY = web.AppKey("watchdog_async.supervisor", Supervisor)
"""``app[SUPERVISOR_KEY]`` is the supervisor :func:`setup` installed (typed)."""


def setup(
    app: web.Application, *, supervisor: Supervisor | None = None, **settings: Any
) -> Supervisor:
    """Install a Supervisor on ``app``: stored as ``app[SUPERVISOR_KEY]`` now, started when the
    app starts and closed (stopping every backend) when it cleans up. ``settings`` are the
    :class:`Supervisor` keywords (``max_loaded=2``, ``shutdown=...``); or pass ``supervisor=``
    one you made (``Supervisor.from_env()``). Returns the supervisor."""
    if supervisor is not None and settings:
        raise ConfigError("pass either supervisor= or settings, not both")
    if supervisor is not None and not isinstance(supervisor, Supervisor):
        raise ConfigError(f"supervisor must be a Supervisor, got {supervisor!r}")
    sup = Supervisor(**settings) if supervisor is None else supervisor
    app[SUPERVISOR_KEY] = sup
    app.cleanup_ctx.append(_lifetime(sup))
    return sup


def _lifetime(sup: Supervisor) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # The supervisor runs in a task of its own: aiohttp may run startup and cleanup in
        # different tasks, and a task group must be left in the task that entered it.
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def host() -> None:
            async with sup:
                started.set_result(None)
                await asyncio.Future()  # until cleanup cancels this task

        task = asyncio.create_task(host(), name="watchdog_async supervisor")
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():  # failed to start
            task.result()
            raise RuntimeError("the supervisor stopped while starting")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})  # closing stops every backend (bounded by stop_timeout)
            error = None if task.cancelled() else task.exception()
            if error is not None:  # the supervisor failed while the app ran
                raise error

    return lifetime


def get_supervisor(request: web.Request) -> Supervisor:
    """The supervisor :func:`setup` installed on the request's app (or a parent app)."""
    try:
        return request.config_dict[SUPERVISOR_KEY]
    except KeyError:
        raise RuntimeError(
            "no supervisor on this application: call watchdog_async.aiohttp.setup(app)"
        ) from None


def error_response(exc: BaseException, *, retry_after: int = 1) -> web.Response | None:
    """The HTTP answer to one of the supervisor\'s errors (see README\'s table), or None for
    any other exception."""
    answer = http_error(exc, retry_after=retry_after)
    if answer is None:
        return None
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


def error_middleware(*, retry_after: int = 1) -> Middleware:
    """A middleware answering the supervisor's errors as :func:`error_response` says, when a
    handler raises one before it started its response; later, the error propagates (aiohttp
    then closes the connection: the client sees a broken stream, not a false success)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except WatchdogError as exc:
            response = error_response(exc, retry_after=retry_after)
            if response is None or request.writer.output_size > 0:
                raise
            return response

    return middleware
