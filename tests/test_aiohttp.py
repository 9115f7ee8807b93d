"""watchdog_async.aiohttp: setup() and its cleanup context, get_supervisor(), the error
middleware, and a streaming handler holding a backend busy until its last chunk, served for
real by aiohttp's test server on a loopback port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from _children import is_gone, sleeper_argv
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from watchdog_async import (
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    EvictionReason,
    Supervisor,
    SupervisorClosedError,
    UnknownBackendError,
)
from watchdog_async.aiohttp import (
    SUPERVISOR_KEY,
    error_middleware,
    error_response,
    get_supervisor,
    setup,
)

ADDRESS = "mem://a"


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[httpx.AsyncClient]:
    """Start ``app`` on a free loopback port; yield an httpx client for it; then clean up."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            yield client
    finally:
        await server.close()


async def start_sleeper() -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *sleeper_argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    return proc


async def models(request: web.Request) -> web.Response:
    sup = get_supervisor(request)
    return web.json_response({"models": [s.model for s in sup.snapshot()]})


# -- setup and the supervisor's lifetime --------------------------------------------------------


async def test_setup_runs_the_supervisor_for_the_apps_lifetime() -> None:
    app = web.Application()
    sup = setup(app, max_loaded=3, stop_timeout=1)
    assert app[SUPERVISOR_KEY] is sup
    assert sup.settings.max_loaded == 3
    app.router.add_get("/models", models)
    sub = web.Application()
    sub.router.add_get("/models", models)
    app.add_subapp("/sub", sub)
    with pytest.raises(SupervisorClosedError):
        sup.register(ADDRESS, "early")  # not started before the app starts
    async with serving(app) as client:
        proc = await start_sleeper()
        sup.register("127.0.0.1:1", "a", process=proc)
        assert (await client.get("/models")).json() == {"models": ["a"]}
        assert (await client.get("/sub/models")).json() == {"models": ["a"]}  # config_dict
    assert is_gone(proc.pid)  # stop_on_exit: the cleanup stopped it
    with anyio.fail_after(5):
        await proc.wait()
    with pytest.raises(SupervisorClosedError):
        sup.register(ADDRESS, "late")


async def test_startup_and_cleanup_may_run_in_different_tasks() -> None:
    app = web.Application()
    sup = setup(app)
    runner = web.AppRunner(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.setup)
    sup.register(ADDRESS, "a")  # running, though the task that started it has ended
    assert sup.loaded_count == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.cleanup)
    with pytest.raises(SupervisorClosedError):
        sup.touch(ADDRESS)


async def test_a_supervisor_that_cannot_start_fails_the_apps_startup() -> None:
    used = Supervisor()
    async with used:
        pass
    app = web.Application()
    setup(app, supervisor=used)
    runner = web.AppRunner(app)
    with pytest.raises(SupervisorClosedError):
        await runner.setup()
    await runner.cleanup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"supervisor": Supervisor(), "max_loaded": 2}, "either supervisor= or settings"),
        ({"supervisor": "nope"}, "must be a Supervisor"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
    ],
)
def test_setup_arguments_are_checked_at_once(kwargs: dict[str, Any], match: str) -> None:
    app = web.Application()
    with pytest.raises(ConfigError, match=match):
        setup(app, **kwargs)
    assert SUPERVISOR_KEY not in app and not app.cleanup_ctx


def test_get_supervisor_without_setup_says_what_to_do() -> None:
    request = make_mocked_request("GET", "/", app=web.Application())
    with pytest.raises(RuntimeError, match="setup"):
        get_supervisor(request)


# -- error middleware -------------------------------------------------------------------------


def _raising_app(exc: Exception, *, retry_after: int = 1) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[error_middleware(retry_after=retry_after)])
    app.router.add_get("/", handler)
    return app


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (BackendBusyError(ADDRESS, "2 callers already waiting"), 503, "1"),
        (CapacityError("no room"), 503, "1"),
        (BackendStoppedError(ADDRESS, EvictionReason.EXITED), 503, "1"),
        (SupervisorClosedError("the supervisor is closed"), 503, None),
        (UnknownBackendError(ADDRESS), 404, None),
    ],
)
async def test_the_middleware_answers_the_supervisors_errors(
    exc: Exception, status: int, retry_after: str | None
) -> None:
    async with serving(_raising_app(exc)) as client:
        response = await client.get("/")
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    body = response.json()
    assert (body["error"], body["detail"]) == (type(exc).__name__, str(exc))
    if isinstance(exc, BackendStoppedError):
        assert body["reason"] == "exited"


async def test_retry_after_is_configurable_and_other_errors_are_500() -> None:
    async with serving(_raising_app(BackendBusyError(ADDRESS, "full"), retry_after=9)) as client:
        assert (await client.get("/")).headers["retry-after"] == "9"
    async with serving(_raising_app(ConfigError("bad"))) as client:
        assert (await client.get("/")).status_code == 500
    assert error_response(ValueError("x")) is None


async def test_an_error_after_the_response_started_breaks_the_stream() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        raise BackendStoppedError(ADDRESS, EvictionReason.BUSY_TIMEOUT)

    app = web.Application(middlewares=[error_middleware()])
    app.router.add_get("/", handler)
    async with serving(app) as client, client.stream("GET", "/") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # not a clean end, not a second answer
            await response.aread()


# -- streaming --------------------------------------------------------------------------------


class Gated:
    """A streaming handler holding ``busy(ADDRESS)``: one chunk per ``release()`` (the first
    at once), one more release ends it."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.permits = anyio.Semaphore(1)
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.error: BaseException | None = None
        self.left = anyio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        sup = get_supervisor(request)
        response = web.StreamResponse()
        try:
            async with sup.busy(ADDRESS):
                self.tasks.append(asyncio.current_task())
                await response.prepare(request)
                for i in range(self.chunks):
                    await self.permits.acquire()
                    await response.write(b"chunk%d;" % i)
                await self.permits.acquire()
                await response.write_eof()
                self.tasks.append(asyncio.current_task())
        except BaseException as exc:
            self.error = exc
            self.tasks.append(asyncio.current_task())
            raise
        finally:
            self.left.set()
        return response


def _streaming_app(gated: Gated, **settings: Any) -> web.Application:
    app = web.Application(middlewares=[error_middleware()])
    setup(app, **settings)

    async def register(app: web.Application) -> None:
        app[SUPERVISOR_KEY].register(ADDRESS, "a")

    app.on_startup.append(register)  # runs after setup()'s cleanup context started it
    app.router.add_get("/stream", gated.handler)
    return app


def _inflight(sup: Supervisor) -> int:
    return sum(s.inflight for s in sup.snapshot())


async def test_a_handler_holds_busy_until_its_last_chunk_in_one_task() -> None:
    gated = Gated(3)
    app = _streaming_app(gated)
    sup = app[SUPERVISOR_KEY]
    async with serving(app) as client, client.stream("GET", "/stream") as response:
        chunks = response.aiter_raw()
        received = b""
        for i in range(3):
            if i:
                gated.permits.release()
            while not received.endswith(b"chunk%d;" % i):
                received += await anext(chunks)
            assert _inflight(sup) == 1, f"after chunk {i}"
        gated.permits.release()
        async for rest in chunks:
            received += rest
        assert received == b"chunk0;chunk1;chunk2;"
        with anyio.fail_after(5):
            await gated.left.wait()
        assert _inflight(sup) == 0
    assert gated.error is None
    assert len(gated.tasks) == 2 and gated.tasks[0] is gated.tasks[1]


async def test_a_full_wait_queue_is_a_503_with_retry_after() -> None:
    gated = Gated(1)
    app = _streaming_app(gated, max_concurrency=1, max_waiting=0)
    async with serving(app) as client, client.stream("GET", "/stream") as first:
        chunks = first.aiter_raw()
        assert await anext(chunks) == b"chunk0;"
        second = await client.get("/stream")
        assert second.status_code == 503
        assert second.headers["retry-after"] == "1"
        assert second.json()["error"] == "BackendBusyError"
        gated.permits.release()
        assert b"".join([c async for c in chunks]) == b""


async def test_a_client_going_away_releases_busy_at_the_next_write() -> None:
    gated = Gated(1000)
    app = _streaming_app(gated)
    sup = app[SUPERVISOR_KEY]
    async with serving(app) as client:
        async with client.stream("GET", "/stream") as response:
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"chunk0;"
            assert _inflight(sup) == 1
        with anyio.fail_after(5):
            while not gated.left.is_set():  # until a write meets the closed connection
                gated.permits.release()
                await anyio.sleep(0.01)
        assert _inflight(sup) == 0
        assert isinstance(gated.error, ConnectionError | asyncio.CancelledError)
        assert gated.tasks[0] is gated.tasks[1]
