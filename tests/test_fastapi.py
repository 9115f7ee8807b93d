"""watchdog_async.fastapi: the lifespan, the dependency, the exception handlers and
BusyStreamingResponse, served for real by uvicorn on a loopback port where streaming matters.

Streams are driven by events (the test releases each chunk), not by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from _children import is_gone, sleeper_argv
from _support import uvicorn_serving
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Message

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
from watchdog_async.fastapi import (
    BusyStreamingResponse,
    SupervisorDep,
    add_exception_handlers,
    error_response,
    get_supervisor,
    supervisor_lifespan,
)
from watchdog_async.testing import ManualClock, settle

ADDRESS = "mem://a"  # a backend with no process: evicting it only forgets it


async def start_sleeper() -> asyncio.subprocess.Process:
    argv = sleeper_argv()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    return proc


# -- lifespan -------------------------------------------------------------------------------


async def test_lifespan_wraps_the_users_lifespan_and_stops_backends_on_exit() -> None:
    seen: list[str] = []
    proc: asyncio.subprocess.Process | None = None

    @asynccontextmanager
    async def mine(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        nonlocal proc
        sup = app.state.supervisor
        assert isinstance(sup, Supervisor)
        proc = await start_sleeper()
        sup.register("127.0.0.1:1", "pinned-model", process=proc, pinned=True)
        seen.append("user startup")
        yield {"greeting": "hello"}
        seen.append("user shutdown")
        assert sup.loaded_count == 1  # the supervisor closes after the user's lifespan

    app = FastAPI(lifespan=supervisor_lifespan(mine, max_loaded=3, stop_timeout=1))

    @app.get("/info")
    async def info(request: Request, sup: SupervisorDep) -> dict[str, Any]:
        return {
            "greeting": request.state.greeting,  # the user's lifespan state passes through
            "max_loaded": sup.settings.max_loaded,
            "models": [s.model for s in sup.snapshot()],
        }

    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/info")
        assert response.json() == {
            "greeting": "hello",
            "max_loaded": 3,
            "models": ["pinned-model"],
        }
        sup = app.state.supervisor
    assert seen == ["user startup", "user shutdown"]
    assert proc is not None and is_gone(proc.pid)  # stop_on_exit
    with anyio.fail_after(5):
        await proc.wait()  # collect its status (the supervisor never reaps)
    with pytest.raises(SupervisorClosedError):
        sup.register("127.0.0.1:2", "late")


async def test_lifespan_is_a_plain_async_context_manager_too() -> None:
    app = FastAPI()
    async with supervisor_lifespan(max_loaded=1)(app) as state:
        assert state is None
        sup = get_supervisor(_request(app))
        assert sup.settings.max_loaded == 1
        sup.register(ADDRESS, "a")
        assert sup.loaded_count == 1
    with pytest.raises(SupervisorClosedError):
        sup.touch(ADDRESS)


async def test_a_factory_makes_a_new_supervisor_each_run_an_instance_runs_once() -> None:
    made: list[Supervisor] = []

    def factory() -> Supervisor:
        made.append(Supervisor(max_loaded=5))
        return made[-1]

    app = FastAPI()
    lifespan = supervisor_lifespan(supervisor=factory)
    for _ in range(2):
        async with lifespan(app):
            assert app.state.supervisor is made[-1]
    assert len(made) == 2 and made[0] is not made[1]

    once = supervisor_lifespan(supervisor=Supervisor())
    async with once(app):
        pass
    with pytest.raises(SupervisorClosedError):
        async with once(app):
            pass


async def test_a_factory_returning_something_else_fails_at_startup() -> None:
    lifespan = supervisor_lifespan(supervisor=lambda: "nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="factory returned"):
        async with lifespan(FastAPI()):
            pass


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"supervisor": Supervisor(), "max_loaded": 2}, "either supervisor= or settings"),
        ((), {"supervisor": 42}, "Supervisor or a factory"),
        ((), {"max_loaded": -1}, "max_loaded"),
        ((), {"no_such_setting": 1}, "unknown setting"),
        (("not callable",), {}, "lifespan must be a callable"),
    ],
)
def test_lifespan_arguments_are_checked_at_once(
    args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        supervisor_lifespan(*args, **kwargs)


def _request(app: FastAPI) -> Request:
    return Request({"type": "http", "app": app, "headers": []})


def test_get_supervisor_without_the_lifespan_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="supervisor_lifespan"):
        get_supervisor(_request(FastAPI()))


# -- exception handlers -----------------------------------------------------------------------


def _raising_app(exc: Exception, *, retry_after: int = 1) -> FastAPI:
    app = FastAPI()
    add_exception_handlers(app, retry_after=retry_after)

    @app.get("/")
    async def endpoint() -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (BackendBusyError(ADDRESS, "2 callers already waiting"), 503, "1"),
        (CapacityError("no room"), 503, "1"),
        (BackendStoppedError(ADDRESS, EvictionReason.BUSY_TIMEOUT), 503, "1"),
        (SupervisorClosedError("the supervisor is closed"), 503, None),
        (UnknownBackendError(ADDRESS), 404, None),
    ],
)
async def test_exception_handlers_answer_the_supervisors_errors(
    exc: Exception, status: int, retry_after: str | None
) -> None:
    transport = httpx.ASGITransport(app=_raising_app(exc))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    body = response.json()
    assert body["error"] == type(exc).__name__
    assert body["detail"] == str(exc)
    if isinstance(exc, BackendStoppedError):
        assert body["reason"] == "busy_timeout"


async def test_retry_after_is_configurable_and_other_errors_are_not_handled() -> None:
    app = _raising_app(BackendBusyError(ADDRESS, "full"), retry_after=7)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).headers["retry-after"] == "7"
    transport = httpx.ASGITransport(
        app=_raising_app(ConfigError("bad")), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).status_code == 500
    assert error_response(ValueError("x")) is None


# -- streaming --------------------------------------------------------------------------------


class Gated:
    """A body generator that holds ``busy(ADDRESS)`` and yields one chunk per ``release()``
    (the first one comes at once; one more release ends it)."""

    def __init__(self, sup: Supervisor, chunks: int) -> None:
        self.sup = sup
        self.chunks = chunks
        self.permits = anyio.Semaphore(1)  # the first chunk comes at once
        self.left = anyio.Event()
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.error: BaseException | None = None

    def release(self) -> None:
        self.permits.release()

    async def _next(self) -> None:
        await self.permits.acquire()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async with self.sup.busy(ADDRESS):
                self.tasks.append(asyncio.current_task())
                for i in range(self.chunks):
                    await self._next()
                    yield b"chunk%d;" % i
                await self._next()  # one more release ends the body
                self.tasks.append(asyncio.current_task())
        except BaseException as exc:
            self.error = exc
            self.tasks.append(asyncio.current_task())
            raise
        finally:
            self.left.set()


def _streaming_app(
    make: Callable[[Supervisor], Gated], response_class: type[StreamingResponse], **settings: Any
) -> tuple[FastAPI, list[Gated]]:
    streams: list[Gated] = []

    @asynccontextmanager
    async def register(app: FastAPI) -> AsyncIterator[None]:
        app.state.supervisor.register(ADDRESS, "a")
        yield

    app = FastAPI(lifespan=supervisor_lifespan(register, **settings))

    @app.get("/stream")
    async def stream(sup: SupervisorDep) -> Response:
        gated = make(sup)
        streams.append(gated)
        return response_class(gated.body(), media_type="text/plain")

    return app, streams


def _inflight(sup: Supervisor) -> int:
    return sum(s.inflight for s in sup.snapshot())


@pytest.mark.parametrize("response_class", [StreamingResponse, BusyStreamingResponse])
async def test_busy_entered_in_the_generator_holds_until_the_last_chunk_in_one_task(
    response_class: type[StreamingResponse],
) -> None:
    app, streams = _streaming_app(lambda sup: Gated(sup, 4), response_class)
    async with (
        uvicorn_serving(app) as url,
        httpx.AsyncClient(base_url=url) as client,
        client.stream("GET", "/stream") as response,
    ):
        sup = app.state.supervisor
        received = b""
        chunks = response.aiter_raw()
        for i in range(4):
            if i:
                streams[0].release()
            while not received.endswith(b"chunk%d;" % i):
                received += await anext(chunks)
            assert _inflight(sup) == 1, f"after chunk {i}"
            assert sup.snapshot()[0].busy_for is not None
        streams[0].release()
        async for rest in chunks:
            received += rest
        assert received == b"chunk0;chunk1;chunk2;chunk3;"
        assert _inflight(sup) == 0  # left before the response ended
    gated = streams[0]
    assert gated.error is None
    assert (
        len(gated.tasks) == 2 and gated.tasks[0] is gated.tasks[1]
    )  # entered and left in one task


async def test_an_error_before_the_first_chunk_is_a_503_with_retry_after() -> None:
    app, streams = _streaming_app(
        lambda sup: Gated(sup, 2), BusyStreamingResponse, max_concurrency=1, max_waiting=0
    )
    async with (
        uvicorn_serving(app) as url,
        httpx.AsyncClient(base_url=url) as client,
        client.stream("GET", "/stream") as first,
    ):
        chunks = first.aiter_raw()  # kept: a dropped iterator would close the response
        assert await anext(chunks) == b"chunk0;"  # holds the only slot
        second = await client.get("/stream")
        assert second.status_code == 503
        assert second.headers["retry-after"] == "1"
        assert second.json()["error"] == "BackendBusyError"
        assert streams[1].left.is_set() and isinstance(streams[1].error, BackendBusyError)
        streams[0].release()
        streams[0].release()
        assert b"".join([c async for c in chunks]) == b"chunk1;"


async def test_a_client_going_away_while_queued_leaves_the_queue() -> None:
    app, streams = _streaming_app(
        lambda sup: Gated(sup, 1), BusyStreamingResponse, max_concurrency=1, max_waiting=1
    )
    async with (
        uvicorn_serving(app) as url,
        httpx.AsyncClient(base_url=url) as client,
        client.stream("GET", "/stream") as first,
    ):
        sup = app.state.supervisor
        chunks = first.aiter_raw()
        assert await anext(chunks) == b"chunk0;"  # holds the only slot
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/stream")  # waits in the queue, headers not sent
            with anyio.fail_after(5):
                while sup.snapshot()[0].waiting == 0:  # noqa: ASYNC110 (no event for this)
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()  # the second client gives up: its connection closes
        with anyio.fail_after(5):
            await streams[1].left.wait()
        assert sup.snapshot()[0].waiting == 0
        assert isinstance(streams[1].error, asyncio.CancelledError)
        streams[0].release()
        assert b"".join([c async for c in chunks]) == b""


async def test_an_unknown_error_before_the_first_chunk_is_a_500() -> None:
    async def failing() -> AsyncIterator[bytes]:
        raise RuntimeError("model exploded")
        yield b""  # pragma: no cover

    app = FastAPI()

    @app.get("/")
    async def endpoint() -> Response:
        return BusyStreamingResponse(failing())

    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).status_code == 500


async def test_a_client_going_away_leaves_busy_in_the_streaming_task() -> None:
    app, streams = _streaming_app(lambda sup: Gated(sup, 1000), BusyStreamingResponse)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("GET", "/stream") as response:
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"chunk0;"
            assert _inflight(app.state.supervisor) == 1
        # leaving the block closed the connection mid-stream
        with anyio.fail_after(5):
            await streams[0].left.wait()
        assert _inflight(app.state.supervisor) == 0
        assert isinstance(streams[0].error, asyncio.CancelledError)
        assert streams[0].tasks[0] is streams[0].tasks[1]


async def test_a_forced_stop_mid_stream_fails_the_streaming_task_and_breaks_the_stream() -> None:
    app, streams = _streaming_app(lambda sup: Gated(sup, 1000), BusyStreamingResponse)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("GET", "/stream") as response:
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"chunk0;"
            eviction = await app.state.supervisor.evict(ADDRESS, force=True)
            assert eviction.ok and eviction.reason is EvictionReason.MANUAL
            with pytest.raises(httpx.RemoteProtocolError):  # no clean end: a broken stream
                async for _ in chunks:
                    pass
        assert isinstance(streams[0].error, asyncio.CancelledError | BackendStoppedError)
        assert streams[0].tasks[0] is streams[0].tasks[1]


async def test_the_asgi_2_4_path_turns_a_send_failure_into_client_disconnect() -> None:
    closed = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"one"
            yield b"two"
        finally:
            closed.set()

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("connection reset")

    async def receive() -> Message:  # pragma: no cover - not read on this path
        raise AssertionError("no disconnect watcher on ASGI 2.4")

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        await BusyStreamingResponse(body())(scope, receive, send)
    assert closed.is_set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_an_empty_body_is_an_empty_200() -> None:
    async def body() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover

    app = FastAPI()

    @app.get("/")
    async def endpoint() -> Response:
        return BusyStreamingResponse(body())

    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
    assert (response.status_code, response.content) == (200, b"")


def test_busy_streaming_response_needs_an_async_iterable() -> None:
    with pytest.raises(TypeError, match="async iterable"):
        BusyStreamingResponse([b"sync"])  # type: ignore[arg-type]


async def test_a_long_stream_through_acquire_reports_progress() -> None:
    clock = ManualClock()

    async def start(model: str) -> tuple[str, None]:
        return ADDRESS, None

    async with Supervisor(busy_timeout=10, clock=clock) as sup:
        acquired = sup.acquire("a", start)
        async with acquired:
            for _ in range(3):  # 24 s of streaming, progress every 8 s
                clock.advance(8)
                acquired.progress()
                await settle(sup)
            assert sup.loaded_count == 1  # not taken for hung
