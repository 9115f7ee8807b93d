"""What the two example apps share: starting ``model_server.py`` as a real subprocess per model,
streaming a completion from it (a small standard-library HTTP client, so the examples need no
extra client library), settings from the environment, and the JSON views of the supervisor.

Environment (all optional):

- ``WATCHDOG_*``: every Supervisor setting (``WATCHDOG_MAX_LOADED=3``,
  ``WATCHDOG_IDLE_TIMEOUT=15m``...); the examples default to ``max_loaded=2``,
  ``idle_timeout=5m``, ``stop_timeout=5s``, ``start_timeout=30s``, ``busy_timeout=30s``
  (a backend that sends no token for 30 s is hung: the apps report progress per token).
- ``MODEL_SERVER_HOLD_MB`` (default 16): memory each model server holds.
- ``MODEL_SERVER_TOKEN_DELAY`` (default 0.05): seconds between streamed tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from watchdog_async import Backend, BackendStatus, Eviction, Settings

MODEL_SERVER = Path(__file__).resolve().with_name("model_server.py")
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
"""Model names the examples accept (each becomes a command-line argument of a new process)."""

DEFAULTS: dict[str, Any] = {
    "max_loaded": 2,
    "idle_timeout": "5m",
    "stop_timeout": "5s",
    "start_timeout": "30s",
    "busy_timeout": "30s",
}


def settings_from_env(
    environ: Mapping[str, str] | None = None, prefix: str = "WATCHDOG_", **overrides: Any
) -> Settings:
    """The examples' defaults, overridden by ``PREFIX*`` variables, overridden by ``overrides``."""
    env = os.environ if environ is None else environ
    defaults = {k: v for k, v in DEFAULTS.items() if prefix + k.upper() not in env}
    return Settings.from_env(prefix, environ=env, **{**defaults, **overrides})


class BackendError(Exception):
    """The model server answered with an error, or not as HTTP."""


@dataclass(eq=False)
class Launcher:
    """Starts one ``model_server.py`` per model (``start`` is what ``sup.acquire`` awaits) and
    stops it gracefully (``shutdown`` is the supervisor's callback): SIGTERM, then wait for its
    exit status, as the owner of the process. The supervisor signals the whole process tree
    itself if that takes longer than ``stop_timeout``."""

    hold_mb: int = 16
    token_delay: float = 0.05
    ready_timeout: float = 15.0
    processes: dict[int, asyncio.subprocess.Process] = field(default_factory=dict, init=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Launcher:
        env = os.environ if environ is None else environ
        return cls(
            hold_mb=int(env.get("MODEL_SERVER_HOLD_MB", "16")),
            token_delay=float(env.get("MODEL_SERVER_TOKEN_DELAY", "0.05")),
        )

    async def start(self, model: str) -> tuple[str, asyncio.subprocess.Process]:
        """Start a model server for ``model`` on a free loopback port; return its address
        and process once it says ``ready``."""
        for pid in [pid for pid, p in self.processes.items() if p.returncode is not None]:
            del self.processes[pid]  # exited by itself meanwhile (collected already)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(MODEL_SERVER),
            "--port",
            "0",
            "--model",
            model,
            "--hold-mb",
            str(self.hold_mb),
            "--token-delay",
            str(self.token_delay),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            with anyio.fail_after(self.ready_timeout):
                line = (await process.stdout.readline()).decode(errors="replace").split()
            if len(line) != 2 or line[0] != "ready" or not line[1].isdigit():
                raise BackendError(f"model server for {model!r} did not start: {line!r}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await process.wait()
            raise
        self.processes[process.pid] = process
        return f"127.0.0.1:{line[1]}", process

    async def shutdown(self, backend: Backend) -> None:
        """Stop one model server: SIGTERM, then wait for it to exit (and collect its status)."""
        process = self.processes.pop(backend.pid, None) if backend.pid is not None else None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        await process.wait()


async def stream_completion(
    address: str, prompt: str, max_tokens: int
) -> AsyncGenerator[bytes, None]:
    """POST /complete to the model server at ``address``; yield each chunk as it comes."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
        writer.write(
            f"POST /complete HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        status = (await reader.readline()).split()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(status) < 2 or status[1] != b"200":
            raise BackendError(f"model server at {address} answered {b' '.join(status)!r}")
        if headers.get("transfer-encoding") != "chunked":
            raise BackendError(f"model server at {address} did not stream")
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            chunk = await reader.readexactly(size)
            await reader.readexactly(2)
            yield chunk
    except (ValueError, asyncio.IncompleteReadError) as exc:
        raise BackendError(f"model server at {address}: malformed response ({exc})") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def backend_view(status: BackendStatus, settings: Settings) -> dict[str, Any]:
    """One row of ``GET /backends`` (like Ollama's ``/api/ps``)."""
    expires_in = None
    if status.idle_for is not None and settings.idle_timeout is not None and not status.pinned:
        expires_in = max(0.0, settings.idle_timeout - status.idle_for)
    return {
        "model": status.model,
        "address": status.address,
        "pid": status.pid,
        "inflight": status.inflight,
        "waiting": status.waiting,
        "busy_for": status.busy_for,
        "idle_for": status.idle_for,
        "expires_in": expires_in,
        "pinned": status.pinned,
        "stopping": status.stopping,
    }


def eviction_view(eviction: Eviction) -> dict[str, Any]:
    """One eviction as JSON."""
    return {
        "model": eviction.model,
        "address": eviction.address,
        "reason": eviction.reason.value,
        "ok": eviction.ok,
        "error": None if eviction.error is None else repr(eviction.error),
        "duration": round(eviction.duration, 3),
    }
