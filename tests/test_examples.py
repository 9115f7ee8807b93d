"""The example apps, each started for real on a loopback port (uvicorn in this process for
FastAPI, aiohttp's test server for aiohttp) with real ``model_server.py`` subprocesses as
backends; then each script run with its one command; then the model server alone.

Every test here runs against both apps. Token delays are small; the one test that watches a
stream in flight uses a slower one.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import psutil
import pytest
from _children import is_gone
from _support import uvicorn_serving
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from watchdog_async import ConfigError, DeviceMemory, Supervisor
from watchdog_async.aiohttp import SUPERVISOR_KEY
from watchdog_async.testing import ScriptedProbe, gib

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GPU = DeviceMemory(0, "Fake GPU", total=gib(24), used=gib(3), kind="gpu")
FAST = 0.005  # seconds between tokens where the test does not watch the stream


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples import their sibling ``_backends``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


backends = example("_backends")


@dataclass(eq=False)
class RecordingLauncher(backends.Launcher):  # type: ignore[misc,name-defined]
    """The examples' launcher, remembering every model server it started."""

    started: list[tuple[str, int]] = field(default_factory=list, init=False)

    async def start(self, model: str) -> tuple[str, asyncio.subprocess.Process]:
        address, process = await super().start(model)
        self.started.append((model, process.pid))
        return address, process


@dataclass
class Running:
    client: httpx.AsyncClient
    sup: Supervisor
    launcher: Any


@asynccontextmanager
async def running(
    kind: str, *, token_delay: float = FAST, launcher: Any = None, **settings: Any
) -> AsyncIterator[Running]:
    """Start the example app ``kind`` with the examples' defaults from an empty environment,
    overridden by ``settings``; yield a client, its supervisor and its launcher."""
    values = backends.settings_from_env(environ={}, **{"stop_timeout": 1, **settings})
    if launcher is None:
        launcher = RecordingLauncher(hold_mb=1, token_delay=token_delay)
    probe = ScriptedProbe([GPU])
    if kind == "fastapi":
        app = example("fastapi_app").create_app(values, launcher=launcher, memory_probe=probe)
        async with (
            uvicorn_serving(app) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as client,
        ):
            yield Running(client, app.state.supervisor, launcher)
        return
    app = example("aiohttp_app").create_app(values, launcher=launcher, memory_probe=probe)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base_url = str(server.make_url(""))
        async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
            yield Running(client, app[SUPERVISOR_KEY], launcher)
    finally:
        await server.close()


@pytest.fixture(params=["fastapi", "aiohttp"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def complete(
    client: httpx.AsyncClient, model: str, prompt: str, *, stream: bool = True
) -> str:
    response = await client.post(
        "/complete", json={"model": model, "prompt": prompt, "stream": stream}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["response"]) if not stream else response.text


# -- the apps ---------------------------------------------------------------------------------


async def test_concurrent_requests_across_more_models_than_max_loaded(kind: str) -> None:
    async with running(kind, max_loaded=2) as app:
        most = 0
        done = anyio.Event()

        async def watch() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, app.sup.loaded_count)
                await anyio.sleep(0.002)

        results: dict[tuple[str, int], str] = {}

        async def call(model: str, i: int) -> None:
            results[model, i] = await complete(app.client, model, f"say {i}", stream=i % 2 == 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as calls:
                for model in ("a", "b", "c"):
                    for i in range(3):
                        calls.start_soon(call, model, i)
            done.set()
        assert results == {(m, i): f"[{m}] say {i} " for m in "abc" for i in range(3)}
        assert most <= 2
        assert app.sup.loaded_count <= 2
        assert {m for m, _ in app.launcher.started} == {"a", "b", "c"}
        scraped = metrics((await app.client.get("/metrics")).text)
        assert scraped[("watchdog_evictions_total", frozenset({("reason", "lru"), ("ok", "true")}))]
        assert scraped[("watchdog_backends_loaded", frozenset())] <= 2


async def test_a_stream_holds_its_backend_busy_until_the_last_chunk(kind: str) -> None:
    words = "one two three four"
    async with (
        running(kind, token_delay=0.15) as app,
        app.client.stream("POST", "/complete", json={"model": "a", "prompt": words}) as response,
    ):
        assert response.status_code == 200
        received: list[bytes] = []
        chunks = response.aiter_raw()
        while len(received) < 4:  # tokens "[a]" one two three; "four" is the last
            received.append(await anext(chunks))
            rows = (await app.client.get("/backends")).json()["models"]
            assert [(r["model"], r["inflight"]) for r in rows] == [("a", 1)], received
            assert rows[0]["busy_for"] is not None and rows[0]["idle_for"] is None
            scraped = metrics((await app.client.get("/metrics")).text)
            assert scraped[("watchdog_inflight_calls", frozenset({("model", "a")}))] == 1
        async for chunk in chunks:
            received.append(chunk)
        assert b"".join(received) == b"[a] one two three four "
        with anyio.fail_after(5):  # aiohttp leaves busy() just after the last byte is sent
            while app.sup.snapshot()[0].inflight:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.005)
        row = (await app.client.get("/backends")).json()["models"][0]
        assert row["inflight"] == 0 and row["idle_for"] is not None
        assert row["expires_in"] is not None and row["expires_in"] <= 300


async def test_explicit_unload_stops_the_process(kind: str) -> None:
    async with running(kind) as app:
        assert await complete(app.client, "a", "hi", stream=False) == "[a] hi "
        [row] = (await app.client.get("/backends")).json()["models"]
        assert row["model"] == "a" and psutil.pid_exists(row["pid"])
        response = await app.client.delete("/backends/a")
        assert response.status_code == 200
        [eviction] = response.json()["evicted"]
        assert (eviction["model"], eviction["reason"], eviction["ok"]) == ("a", "manual", True)
        assert is_gone(row["pid"])
        assert (await app.client.get("/backends")).json() == {"models": []}
        assert (await app.client.delete("/backends/a")).status_code == 404
        assert (await app.client.delete("/backends/no%20such")).status_code in (404, 422)
        scraped = metrics((await app.client.get("/metrics")).text)
        manual = frozenset({("reason", "manual"), ("ok", "true")})
        assert scraped[("watchdog_evictions_total", manual)] == 1
        assert (
            scraped[("watchdog_stop_duration_seconds_count", frozenset({("reason", "manual")}))]
            == 1
        )
        gpu = frozenset({("device", "0"), ("name", "Fake GPU"), ("kind", "gpu")})
        assert scraped[("watchdog_memory_used_bytes", gpu)] == gib(3)
        assert scraped[("watchdog_memory_total_bytes", gpu)] == gib(24)
        assert scraped[("watchdog_backends_loaded", frozenset())] == 0


async def test_a_full_wait_queue_is_a_503_with_retry_after(kind: str) -> None:
    async with (
        running(kind, token_delay=0.1, max_concurrency=1, max_waiting=0) as app,
        app.client.stream("POST", "/complete", json={"model": "a", "prompt": "x y"}) as first,
    ):
        chunks = first.aiter_raw()
        assert await anext(chunks) == b"[a] "  # holds the only slot
        for stream in (True, False):
            second = await app.client.post(
                "/complete", json={"model": "a", "prompt": "z", "stream": stream}
            )
            assert second.status_code == 503
            assert second.headers["retry-after"] == "1"
            assert second.json()["error"] == "BackendBusyError"
        assert b"".join([c async for c in chunks]) == b"x y "


async def test_a_backend_failing_before_its_first_token_is_a_502(kind: str) -> None:
    class Broken(backends.Launcher):  # type: ignore[misc,name-defined]
        async def start(self, model: str) -> tuple[str, None]:
            if model == "unstartable":
                raise backends.BackendError("no GPU left")
            with socket.socket() as s:  # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                return f"127.0.0.1:{s.getsockname()[1]}", None

    async with running(kind, launcher=Broken()) as app:
        for model in ("deaf", "unstartable"):
            for stream in (True, False):
                response = await app.client.post(
                    "/complete", json={"model": model, "prompt": "x", "stream": stream}
                )
                assert response.status_code == 502, (model, stream, response.text)
        bad = await app.client.post("/complete", json={"model": "../etc", "prompt": "x"})
        assert bad.status_code == 422


async def test_shutting_the_app_down_leaves_no_backend_running(kind: str) -> None:
    async with running(kind, max_loaded=2) as app:
        await complete(app.client, "a", "x")
        await complete(app.client, "b", "y")
        pids = [pid for _, pid in app.launcher.started]
        assert len(pids) == 2 and not any(is_gone(pid) for pid in pids)
    assert all(is_gone(pid) for pid in pids)
    assert app.launcher.processes == {}  # each stopped and its exit status collected


# -- the scripts, each with its one command -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("script", ["fastapi_app.py", "aiohttp_app.py"])
def test_each_example_runs_with_one_command_and_cleans_up(script: str) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "WATCHDOG_STOP_TIMEOUT": "1s",
        "MODEL_SERVER_TOKEN_DELAY": "0.005",
        "MODEL_SERVER_HOLD_MB": "1",
    }
    app = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/backends").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert app.poll() is None, "the app exited while starting"
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.05)
            response = client.post("/complete", json={"model": "m", "prompt": "hello"})
            assert response.text == "[m] hello "
            [row] = client.get("/backends").json()["models"]
        app.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = app.communicate(timeout=20)
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()
    assert app.returncode == 0, stderr.decode()
    assert is_gone(row["pid"])


# -- the model server alone ---------------------------------------------------------------------


async def test_the_model_server_holds_memory_streams_and_exits_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "model_server.py"),
        *("--port", "0", "--model", "tiny", "--hold-mb", "24", "--token-delay", "0.001"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready, port = (await process.stdout.readline()).decode().split()
        assert ready == "ready"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = (await client.get("/health")).json()
            assert health == {
                "status": "ok",
                "model": "tiny",
                "pid": process.pid,
                "held_bytes": 24 * 1024 * 1024,
            }
            assert psutil.Process(process.pid).memory_info().rss >= 24 * 1024 * 1024
            async with client.stream(
                "POST", "/complete", json={"prompt": "a b c d", "max_tokens": 3}
            ) as response:
                assert response.headers["transfer-encoding"] == "chunked"
                assert await response.aread() == b"[tiny] a b "
            bad = await client.post("/complete", content=b"{not json")
            assert bad.status_code == 400
            assert (await client.get("/nowhere")).status_code == 404
        process.terminate()
        with anyio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_model_server_exits_when_its_parent_goes_away() -> None:
    code = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, {str(EXAMPLES / 'model_server.py')!r}, "
        "'--port', '0', '--model', 'orphan', '--hold-mb', '0'], stdout=subprocess.PIPE); "
        "sys.stdout.write(p.stdout.readline().decode()); print(p.pid, flush=True)"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    assert (await parent.stdout.readline()).startswith(b"ready ")
    orphan = int(await parent.stdout.readline())
    await parent.wait()  # the parent is gone; the model server notices within a second
    try:
        with anyio.fail_after(5):
            while not is_gone(orphan):  # noqa: ASYNC110 (another process's exit)
                await anyio.sleep(0.05)
    finally:
        if not is_gone(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_settings_come_from_the_environment_over_the_examples_defaults() -> None:
    defaults = backends.settings_from_env(environ={})
    assert (defaults.max_loaded, defaults.idle_timeout) == (2, 300.0)
    assert (defaults.stop_timeout, defaults.start_timeout) == (5.0, 30.0)
    tuned = backends.settings_from_env(
        environ={"WATCHDOG_MAX_LOADED": "3", "WATCHDOG_IDLE_TIMEOUT": "off"}
    )
    assert (tuned.max_loaded, tuned.idle_timeout) == (3, None)
    with pytest.raises(ConfigError, match="WATCHDOG_MAX_LOADED"):
        backends.settings_from_env(environ={"WATCHDOG_MAX_LOADED": "lots"})
    launcher = backends.Launcher.from_env(
        {"MODEL_SERVER_HOLD_MB": "3", "MODEL_SERVER_TOKEN_DELAY": "0.5"}
    )
    assert (launcher.hold_mb, launcher.token_delay) == (3, 0.5)
    assert json.dumps(backends.DEFAULTS)  # plain values, shown in README
