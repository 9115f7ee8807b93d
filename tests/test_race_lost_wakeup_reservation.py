"""A make_room()/acquire() waiting for room is not woken when a pending load gives its
reservation back (start failed) or registers an idle backend: it sleeps until
eviction_timeout and then raises CapacityError although room was there."""

from __future__ import annotations

import anyio
import pytest

from watchdog_async import CapacityError, Supervisor


async def test_failed_load_wakes_make_room_waiter() -> None:
    gate = anyio.Event()

    async def failing_start(model: str) -> str:
        await gate.wait()
        raise RuntimeError("start failed")

    async with Supervisor(max_loaded=1, eviction_timeout=30) as sup:
        result: list[object] = []

        async def load_a() -> None:
            with pytest.raises(RuntimeError):
                async with sup.acquire("a", failing_start):
                    pass

        async def room() -> None:
            try:
                result.append(await sup.make_room())
            except CapacityError as exc:
                result.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(load_a)
            await anyio.wait_all_tasks_blocked()
            assert sup._reserved == 1  # a's load holds the only slot
            tg.start_soon(room)
            await anyio.wait_all_tasks_blocked()
            assert result == []  # waiting for room, as it should
            gate.set()  # a's start fails: its reservation is given back, the slot is free
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.05)
            done = list(result)
            tg.cancel_scope.cancel()
    assert done == [[]], f"make_room still waiting (would time out after 30 s): {done}"


async def test_registered_idle_backend_wakes_acquire_waiter() -> None:
    """acquire(b) waits for room while a's load holds the slot; a is loaded but nobody uses
    it (its caller went away), so it is idle and evictable: b should evict it and load."""
    gate = anyio.Event()
    started: list[str] = []

    async def start(model: str) -> str:
        started.append(model)
        if model == "a":
            await gate.wait()
        return f"addr-{model}"

    async with Supervisor(max_loaded=1, eviction_timeout=30) as sup:

        async def load_a() -> None:
            async with sup.acquire("a", start):
                pass

        async def load_b() -> None:
            async with sup.acquire("b", start):
                pass

        async with anyio.create_task_group() as tg:
            a_scope = anyio.CancelScope()

            async def a_caller() -> None:
                with a_scope:
                    await load_a()

            tg.start_soon(a_caller)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(load_b)
            await anyio.wait_all_tasks_blocked()
            a_scope.cancel()  # a's caller goes away; the load of a goes on
            await anyio.wait_all_tasks_blocked()
            gate.set()  # a registers, idle: b's load can evict it now
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.05)
            seen = list(started)
            tg.cancel_scope.cancel()
    assert seen == ["a", "b"], f"b's load still waiting for room: started={seen}"
