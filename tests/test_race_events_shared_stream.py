"""Two tasks reading one events() stream: each __anext__ replaces the stream's _ready event
before waiting, so the first reader waits on an event nobody will ever set. It misses
evictions (the other reader gets them all only if it is fast) and, worse, it never ends when
the supervisor closes: close() sets only the latest event. A reader of a closed supervisor
hangs forever."""

from __future__ import annotations

import anyio

from watchdog_async import Supervisor


async def test_every_reader_of_a_stream_ends_at_close() -> None:
    ended: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with Supervisor(stop_on_exit=False) as sup:
                stream = sup.events()

                async def reader(name: str) -> None:
                    async for _ in stream:
                        pass
                    ended.append(name)

                tg.start_soon(reader, "first")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(reader, "second")
                await anyio.wait_all_tasks_blocked()
            # the supervisor is closed: every iteration over its streams must end
            await anyio.wait_all_tasks_blocked()
            snapshot = sorted(ended)
            tg.cancel_scope.cancel()
    assert snapshot == ["first", "second"], f"readers still waiting after close: {snapshot}"
