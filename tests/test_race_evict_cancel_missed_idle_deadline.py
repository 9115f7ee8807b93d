"""An unforced evict() cancelled after the last call ended (asyncio cancellation: aiohttp's
handler cancelled on disconnect, asyncio.timeout) puts the backend back in service and
pushes its idle deadline (evict()'s finally: policy.schedule), but never wakes the deadline
loop. With no other deadline pending the loop sleeps forever: the idle timeout is missed
(until some unrelated change happens to wake the loop)."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import anyio.lowlevel

from watchdog_async import Backend, Supervisor


async def test_cancelled_evict_does_not_lose_the_idle_deadline() -> None:
    stopped: list[str] = []

    async def shutdown(backend: Backend) -> None:
        stopped.append(backend.address)

    with anyio.fail_after(5):
        async with Supervisor(shutdown=shutdown, idle_timeout=0.3) as sup:
            sup.register("a", "m")
            end_call = anyio.Event()

            async def call() -> None:
                async with sup.busy("a"):
                    await end_call.wait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                # the registration's idle deadline passes while the call runs: the entry is
                # dropped (the backend is busy; it is pushed again when it goes idle)
                await anyio.sleep(0.35)
                assert not stopped
                tasks: list[asyncio.Task[object]] = []

                async def evict() -> None:
                    task = asyncio.current_task()
                    assert task is not None
                    tasks.append(task)
                    with contextlib.suppress(asyncio.CancelledError):
                        await sup.evict("a")

                tg.start_soon(evict)
                await anyio.wait_all_tasks_blocked()
                assert sup.snapshot()[0].stopping  # draining
                end_call.set()  # the call ends...
                await anyio.lowlevel.checkpoint()  # (its exit is queued)
                sup._drain()  # ...its exit is applied: the evict is woken
                tasks[0].cancel()  # and the evict's caller goes away just then
                await anyio.wait_all_tasks_blocked()
            assert sup.loaded_count == 1 and not stopped  # back in service, idle
            assert sup.snapshot()[0].stopping is False
            await anyio.sleep(0.6)  # twice its idle timeout
            assert stopped == ["a"], "idle timeout passed long ago, backend not unloaded"
