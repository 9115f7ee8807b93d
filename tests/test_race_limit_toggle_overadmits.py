"""max_concurrency removed and set again before the admitted waiters have run: the removed
limiter admitted them, the new limiter counts only the calls already in flight, so the
waiters enter uncounted and the new limit is exceeded for as long as they run."""

from __future__ import annotations

import anyio

from watchdog_async import BackendBusyError, Supervisor
from watchdog_async.testing import ManualClock, settle


async def test_limit_off_then_on_counts_admitted_waiters() -> None:
    clock = ManualClock(1000.0)
    release_first = anyio.Event()
    release_rest = anyio.Event()
    with anyio.fail_after(5):
        async with Supervisor(clock=clock, max_concurrency=1) as sup:
            sup.register("a", "m")

            async def call(ev: anyio.Event) -> None:
                async with sup.busy("a"):
                    await ev.wait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, release_first)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(call, release_rest)
                tg.start_soon(call, release_rest)
                await anyio.wait_all_tasks_blocked()
                sup.configure(max_concurrency=None)
                sup.configure(max_concurrency=1)
                await anyio.wait_all_tasks_blocked()
                release_first.set()  # one call ends: 2 still in flight, limit 1
                await anyio.wait_all_tasks_blocked()
                await settle(sup)
                # a newcomer must wait (2 calls in flight >= limit 1)
                admitted_newcomer = 0  # calls in flight seen by an admitted newcomer
                try:
                    async with sup.busy("a", wait_timeout=0):
                        admitted_newcomer = sup.snapshot()[0].inflight
                except BackendBusyError:
                    pass
                release_rest.set()
    assert not admitted_newcomer, (
        f"max_concurrency=1 but a newcomer was admitted with {admitted_newcomer} in flight"
    )
