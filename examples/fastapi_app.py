"""Example: a FastAPI completion server whose models are real subprocesses that a Supervisor
loads on demand, keeps at most ``max_loaded`` of (least recently used out first), unloads when
idle, and stops on shutdown.

    python examples/fastapi_app.py            # http://127.0.0.1:8000 (needs the "examples" extra)

    curl -N localhost:8000/complete -H 'Content-Type: application/json' \\
        -d '{"model": "llama", "prompt": "hello there"}'
    curl localhost:8000/backends              # what is loaded (like Ollama's /api/ps)
    curl -X DELETE localhost:8000/backends/llama
    curl localhost:8000/metrics

Settings come from ``WATCHDOG_*`` variables (see ``_backends.py``). A full wait queue
(``BackendBusyError``), no room in time (``CapacityError``) and a backend stopped under the
request (``BackendStoppedError``: evicted, hung or crashed; a retry loads it again) are all
answered 503 with ``Retry-After``: the server is busy or the backend went away; the request was
fine and can be retried.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from _backends import (
    MODEL_NAME_PATTERN,
    BackendError,
    Launcher,
    backend_view,
    eviction_view,
    settings_from_env,
    stream_completion,
)
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, Field

from watchdog_async import MemoryProbe, Settings, Supervisor, UnknownBackendError, default_probe
from watchdog_async.fastapi import (
    BusyStreamingResponse,
    SupervisorDep,
    add_exception_handlers,
    error_response,
    supervisor_lifespan,
)
from watchdog_async.metrics import SupervisorMetrics


class Completion(BaseModel):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    prompt: str = ""
    stream: bool = True
    max_tokens: int = Field(default=16, ge=1, le=4096)


def _bad_gateway(exc: Exception) -> Response | None:
    """503 for the supervisor's errors; 502 when the model server failed before any token."""
    response = error_response(exc)
    if response is None and isinstance(exc, BackendError | OSError):
        response = JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=502)
    return response


def create_app(
    settings: Settings | None = None,
    *,
    launcher: Launcher | None = None,
    memory_probe: MemoryProbe | None = None,
) -> FastAPI:
    """The app. ``settings``: default from the environment; ``memory_probe``: what /metrics
    reports memory from (default: the GPU through NVML, else system RAM)."""
    settings = settings_from_env() if settings is None else settings
    launcher = Launcher.from_env() if launcher is None else launcher
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # runs inside supervisor_lifespan: app.state.supervisor is running already
        probe = default_probe() if memory_probe is None else memory_probe
        try:
            async with SupervisorMetrics(
                app.state.supervisor, registry=registry, memory_probe=probe
            ) as metrics:
                app.state.metrics = metrics
                yield
        finally:
            if memory_probe is None:
                close = getattr(probe, "close", None)
                if callable(close):
                    close()

    app = FastAPI(
        title="watchdog_async example",
        lifespan=supervisor_lifespan(
            lifespan, supervisor=lambda: Supervisor(settings=settings, shutdown=launcher.shutdown)
        ),
    )
    add_exception_handlers(app)

    @app.post("/complete", response_model=None)
    async def complete(body: Completion, sup: SupervisorDep) -> Response:
        if body.stream:

            async def tokens() -> AsyncIterator[bytes]:
                # entered and left in the task that streams: busy until the last chunk
                acquired = sup.acquire(body.model, launcher.start)
                async with acquired as backend:
                    async for chunk in stream_completion(
                        backend.address, body.prompt, body.max_tokens
                    ):
                        acquired.progress()  # a stream that moves is never "hung"
                        yield chunk

            return BusyStreamingResponse(
                tokens(), media_type="text/plain; charset=utf-8", on_error=_bad_gateway
            )
        try:
            async with sup.acquire(body.model, launcher.start) as backend:
                stream = stream_completion(backend.address, body.prompt, body.max_tokens)
                chunks = [c async for c in stream]
        except (BackendError, OSError) as exc:
            response = _bad_gateway(exc)
            assert response is not None
            return response
        text = b"".join(chunks).decode()
        return JSONResponse({"model": body.model, "address": backend.address, "response": text})

    @app.get("/backends")
    async def backends(sup: SupervisorDep) -> dict[str, Any]:
        return {"models": [backend_view(s, sup.settings) for s in sup.snapshot()]}

    @app.delete("/backends/{model}")
    async def unload(
        sup: SupervisorDep,
        model: str = Path(pattern=MODEL_NAME_PATTERN),
        force: bool = False,
    ) -> Response:
        """Unload every backend of ``model``. Unforced, it waits (up to eviction_timeout) for
        the calls in flight to end, else 503; ``?force=true`` fails them at once."""
        addresses = [s.address for s in sup.snapshot() if s.model == model]
        evicted = []
        for address in addresses:
            with contextlib.suppress(UnknownBackendError):  # gone meanwhile (idle, crash)
                evicted.append(eviction_view(await sup.evict(address, force=force)))
        if not evicted:
            return JSONResponse({"detail": f"model {model!r} is not loaded"}, status_code=404)
        return JSONResponse({"evicted": evicted})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = await request.app.state.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="watchdog_async FastAPI example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
