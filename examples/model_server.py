"""A tiny stand-in for a model server (standard library only), started once per model.

    python examples/model_server.py --port 0 --model NAME [--hold-mb M] [--token-delay S]

It listens on 127.0.0.1 (``--port 0``: any free port), holds M MiB of memory (touched, so
resident), prints ``ready PORT`` on stdout once it listens, and serves:

- ``GET /health``: ``{"status": "ok", "model": ..., "pid": ..., "held_bytes": ...}``
- ``POST /complete`` with JSON ``{"prompt": "...", "max_tokens": 16}``: streams the "tokens"
  ``[NAME]`` then the prompt's words, one chunk each (chunked encoding), S seconds apart.

It exits on SIGTERM or SIGINT (status 0), and when its parent process goes away. One request
per connection (``Connection: close``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

MIB = 1024 * 1024
MAX_BODY = 1024 * 1024
PAGE = 4096


class Server:
    def __init__(self, model: str, hold_mb: int, token_delay: float) -> None:
        self.model = model
        self.token_delay = token_delay
        self.held = bytearray(hold_mb * MIB)
        # write one byte per page so the memory is really resident, not just reserved
        self.held[::PAGE] = b"\x01" * len(range(0, len(self.held), PAGE))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").split()
        if len(request_line) != 3:
            return
        method, path, _ = request_line
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        if length > MAX_BODY:
            await self._json(writer, 413, {"error": "body too large"})
            return
        body = await reader.readexactly(length) if length else b""
        if method == "GET" and path == "/health":
            await self._json(
                writer,
                200,
                {
                    "status": "ok",
                    "model": self.model,
                    "pid": os.getpid(),
                    "held_bytes": len(self.held),
                },
            )
        elif method == "POST" and path == "/complete":
            try:
                request = json.loads(body or b"{}")
                prompt = str(request.get("prompt", ""))
                max_tokens = int(request.get("max_tokens", 16))
            except (ValueError, TypeError, AttributeError):
                await self._json(writer, 400, {"error": "expected JSON {prompt, max_tokens}"})
                return
            await self._stream(writer, [f"[{self.model}]", *prompt.split()][: max(1, max_tokens)])
        else:
            await self._json(writer, 404, {"error": f"no route {method} {path}"})

    async def _stream(self, writer: asyncio.StreamWriter, tokens: list[str]) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        for token in tokens:
            await asyncio.sleep(self.token_delay)
            data = f"{token} ".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _json(self, writer: asyncio.StreamWriter, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large"}
        writer.write(
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells a parent has gone)
        await asyncio.sleep(1.0)
    stop.set()  # re-parented: whoever started us is gone


async def serve(args: argparse.Namespace) -> None:
    server = Server(args.model, args.hold_mb, args.token_delay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", args.port)
    port = listener.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    watcher = asyncio.create_task(_watch_parent(os.getppid(), stop))
    await stop.wait()
    watcher.cancel()
    listener.close()  # open streams are cancelled when the loop ends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--model", required=True, help="the model this server pretends to hold")
    parser.add_argument("--hold-mb", type=int, default=16, help="MiB of memory to hold")
    parser.add_argument(
        "--token-delay", type=float, default=0.05, help="seconds between tokens (default 0.05)"
    )
    args = parser.parse_args(argv)
    if args.hold_mb < 0 or args.token_delay < 0:
        parser.error("--hold-mb and --token-delay must be >= 0")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
