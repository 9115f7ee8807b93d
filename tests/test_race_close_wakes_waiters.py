"""Closing the supervisor does not wake make_room()/evict() callers waiting for a busy backend
to go idle (stop_on_exit=False: no stop notifies them). They sleep until eviction_timeout and
then raise CapacityError instead of SupervisorClosedError."""

from __future__ import annotations

import anyio

from watchdog_async import Supervisor, SupervisorClosedError


async def test_close_wakes_make_room_and_evict_waiters() -> None:
    results: dict[str, object] = {}
    hold = anyio.Event()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as outer:
            sup = Supervisor(max_loaded=1, eviction_timeout=30, stop_on_exit=False)
            async with sup:
                sup.register("a", "m")

                async def call() -> None:
                    async with sup.busy("a"):
                        await hold.wait()

                async def room() -> None:
                    try:
                        results["make_room"] = await sup.make_room()
                    except Exception as exc:
                        results["make_room"] = exc

                async def evict() -> None:
                    try:
                        results["evict"] = await sup.evict("a")
                    except Exception as exc:
                        results["evict"] = exc

                outer.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                outer.start_soon(room)
                outer.start_soon(evict)
                await anyio.wait_all_tasks_blocked()
                assert results == {}
            # closed now
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.05)
            snapshot = dict(results)
            hold.set()
            outer.cancel_scope.cancel()
    assert set(snapshot) == {"make_room", "evict"}, f"still waiting after close: {snapshot}"
    assert all(isinstance(v, SupervisorClosedError) for v in snapshot.values()), snapshot
