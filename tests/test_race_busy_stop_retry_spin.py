"""A failed BUSY_TIMEOUT stop is retried at once, again and again (a hot loop)."""

from __future__ import annotations

import contextlib

import anyio

from watchdog_async import BackendStoppedError, Supervisor
from watchdog_async.testing import ManualClock


async def test_failed_busy_timeout_stop_is_not_retried_in_a_hot_loop() -> None:
    clock = ManualClock(1000.0)
    calls: list[float] = []
    release = anyio.Event()

    async def shutdown(backend: object) -> None:
        calls.append(clock())
        if len(calls) >= 50:
            release.set()  # let the hung call end so the test does not spin forever
        raise RuntimeError("cannot stop it")  # no process known: the stop fails

    with anyio.fail_after(10):
        async with Supervisor(shutdown=shutdown, clock=clock, busy_timeout=5) as sup:
            sup.register("a", "m")
            entered = anyio.Event()

            async def hung_call() -> None:
                # a call that does not end when cancelled (a worker thread under busy_sync,
                # a shielded scope, a library that swallows the cancellation...)
                with anyio.CancelScope(shield=True), contextlib.suppress(BackendStoppedError):
                    async with sup.busy("a"):
                        entered.set()
                        try:
                            await release.wait()
                        except BaseException:
                            await release.wait()
                            raise

            async with anyio.create_task_group() as tg:
                tg.start_soon(hung_call)
                await entered.wait()
                sup._drain()
                clock.advance(6)  # past the busy deadline: one stop, which fails
                for _ in range(10):
                    await anyio.sleep(0.01)
                attempts = len(calls)
                release.set()
    # design: "the next eviction that picks it tries again (at most once per call)";
    # _run_stop: "idle from now so a retry is not immediate". The manual clock never moved.
    assert attempts == 1, f"{attempts} stop attempts without the clock moving"
