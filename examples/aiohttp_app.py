"""Example: the same completion server as ``fastapi_app.py``, on aiohttp.

    python examples/aiohttp_app.py            # http://127.0.0.1:8001 (needs the "examples" extra)

    curl -N localhost:8001/complete -H 'Content-Type: application/json' \\
        -d '{"model": "llama", "prompt": "hello there"}'
    curl localhost:8001/backends
    curl -X DELETE localhost:8001/backends/llama
    curl localhost:8001/metrics

Routes, settings and error answers are those of ``fastapi_app.py``: ``BackendBusyError``,
``CapacityError`` and ``BackendStoppedError`` are 503 with ``Retry-After`` (busy, or the backend
went away: the request was fine and can be retried), a model server that fails before its
first token is 502.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import aclosing

from _backends import (
    MODEL_NAME_PATTERN,
    BackendError,
    Launcher,
    backend_view,
    eviction_view,
    settings_from_env,
    stream_completion,
)
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from watchdog_async import MemoryProbe, Settings, Supervisor, UnknownBackendError, default_probe
from watchdog_async.aiohttp import error_middleware, get_supervisor, setup
from watchdog_async.metrics import SupervisorMetrics

LAUNCHER_KEY = web.AppKey("launcher", Launcher)
METRICS_KEY = web.AppKey("metrics", SupervisorMetrics)
_MODEL = re.compile(MODEL_NAME_PATTERN)


def _bad_request(detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=422)


async def complete(request: web.Request) -> web.StreamResponse:
    sup = get_supervisor(request)
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("the body must be JSON: {model, prompt, stream?, max_tokens?}")
    if not isinstance(body, dict):
        return _bad_request("the body must be a JSON object")
    model, prompt = body.get("model"), body.get("prompt", "")
    stream, max_tokens = body.get("stream", True), body.get("max_tokens", 16)
    if not isinstance(model, str) or not _MODEL.match(model):
        return _bad_request(f"model must match {MODEL_NAME_PATTERN}")
    if not isinstance(prompt, str) or not isinstance(stream, bool):
        return _bad_request("prompt must be a string and stream a bool")
    if type(max_tokens) is not int or not 1 <= max_tokens <= 4096:
        return _bad_request("max_tokens must be a whole number in [1, 4096]")
    launcher = request.app[LAUNCHER_KEY]
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        # a handler runs in one task: busy from here until after the last chunk
        acquired = sup.acquire(model, launcher.start)
        async with acquired as backend:
            async with aclosing(stream_completion(backend.address, prompt, max_tokens)) as chunks:
                if not stream:
                    text = b"".join([c async for c in chunks]).decode()
                    return web.json_response(
                        {"model": model, "address": backend.address, "response": text}
                    )
                async for chunk in chunks:
                    acquired.progress()  # a stream that moves is never "hung"
                    if not response.prepared:  # headers after the first token: errors before
                        await response.prepare(request)  # it still get a proper status
                    await response.write(chunk)
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
    except (BackendError, OSError) as exc:
        if response.prepared:
            raise  # mid-stream: aiohttp closes the connection, the client sees it broken
        return web.json_response({"detail": str(exc), "error": type(exc).__name__}, status=502)
    return response


async def backends(request: web.Request) -> web.Response:
    sup = get_supervisor(request)
    return web.json_response({"models": [backend_view(s, sup.settings) for s in sup.snapshot()]})


async def unload(request: web.Request) -> web.Response:
    """Unload every backend of the model; ``?force=true`` fails its calls in flight at once."""
    sup = get_supervisor(request)
    model = request.match_info["model"]
    force = request.query.get("force", "false").lower() in ("1", "true", "yes")
    evicted = []
    for address in [s.address for s in sup.snapshot() if s.model == model]:
        with contextlib.suppress(UnknownBackendError):  # gone meanwhile (idle unload, crash)
            evicted.append(eviction_view(await sup.evict(address, force=force)))
    if not evicted:
        return web.json_response({"detail": f"model {model!r} is not loaded"}, status=404)
    return web.json_response({"evicted": evicted})


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(
    settings: Settings | None = None,
    *,
    launcher: Launcher | None = None,
    memory_probe: MemoryProbe | None = None,
) -> web.Application:
    """The app. ``settings``: default from the environment; ``memory_probe``: what /metrics
    reports memory from (default: the GPU through NVML, else system RAM)."""
    settings = settings_from_env() if settings is None else settings
    app = web.Application(middlewares=[error_middleware()])
    launcher = Launcher.from_env() if launcher is None else launcher
    app[LAUNCHER_KEY] = launcher
    sup = setup(app, supervisor=Supervisor(settings=settings, shutdown=launcher.shutdown))

    async def metrics_lifetime(app: web.Application) -> AsyncIterator[None]:
        probe = default_probe() if memory_probe is None else memory_probe
        try:
            registry = CollectorRegistry()
            async with SupervisorMetrics(sup, registry=registry, memory_probe=probe) as collector:
                app[METRICS_KEY] = collector
                yield
        finally:
            close = getattr(probe, "close", None)
            if memory_probe is None and callable(close):
                close()

    app.cleanup_ctx.append(metrics_lifetime)  # after setup()'s: starts after the supervisor
    app.router.add_post("/complete", complete)
    app.router.add_get("/backends", backends)
    app.router.add_delete("/backends/{model}", unload)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="watchdog_async aiohttp example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
