"""Entering the same busy() handle (or the same acquire() context manager) twice.

- A BusyHandle entered while already in flight overwrites its own state: the inner exit takes
  the call out of flight while the outer one is still running (the backend is seen idle and
  evictable under a live call) and, with max_concurrency, one admission slot is never given
  back: the backend's capacity shrinks for good.
- An _Acquire entered twice keeps only the second handle: both exits leave the second call
  and the first call stays in flight forever (busy_timeout later kills a healthy backend).
- A BusyHandle reused after a forced stop keeps ``stopped`` from the old call: a later,
  successful call through it raises BackendStoppedError.

Either re-entry should be refused (RuntimeError, as for a used contextlib manager), or the
handle must be fully reset; silently corrupting counts is the one thing the README's
"Exact in-flight counts" promise rules out.
"""

from __future__ import annotations

import anyio
import pytest

from watchdog_async import BackendBusyError, BackendStoppedError, Supervisor
from watchdog_async.testing import ManualClock, settle


async def test_nested_reentry_of_one_handle_is_refused_or_counted() -> None:
    clock = ManualClock(1000.0)
    with anyio.fail_after(5):
        async with Supervisor(clock=clock) as sup:
            sup.register("a", "m")
            handle = sup.busy("a")
            try:
                async with handle:
                    async with handle:  # the same object again
                        pass
                    await settle(sup)
                    # the outer call is still running: the backend must be busy
                    inflight = sup.snapshot()[0].inflight
            except RuntimeError:
                return  # re-entry refused: fine
            assert inflight == 1, f"outer call still running, but inflight={inflight}"


async def test_nested_reentry_leaks_admission_slot() -> None:
    clock = ManualClock(1000.0)
    with anyio.fail_after(5):
        async with Supervisor(clock=clock, max_concurrency=2) as sup:
            sup.register("a", "m")
            handle = sup.busy("a")
            try:
                async with handle, handle:
                    pass
            except RuntimeError:
                return  # refused: fine
            await settle(sup)
            try:
                async with sup.busy("a", wait_timeout=0), sup.busy("a", wait_timeout=0):
                    pass
            except BackendBusyError as exc:
                pytest.fail(f"a slot leaked: no call in flight, limit 2, yet {exc!r}")


async def test_acquire_cm_entered_twice_leaves_a_call_in_flight() -> None:
    clock = ManualClock(1000.0)

    async def start(model: str) -> str:
        return "a"

    with anyio.fail_after(5):
        async with Supervisor(clock=clock) as sup:
            acq = sup.acquire("m", start)
            try:
                async with acq, acq:
                    pass
            except RuntimeError:
                return  # re-entry refused: fine
            await settle(sup)
            status = sup.snapshot()[0]
            assert status.inflight == 0, f"both calls ended, {status.inflight} still in flight"


async def test_handle_reused_after_a_stop_does_not_fail_a_good_call() -> None:
    clock = ManualClock(1000.0)
    with anyio.fail_after(5):
        async with Supervisor(clock=clock) as sup:
            sup.register("a", "m")
            handle = sup.busy("a")
            with pytest.raises(BackendStoppedError):
                async with handle:
                    await sup.evict("a", force=True)
            await settle(sup)
            sup.register("a", "m")  # loaded again at the same address
            try:
                async with handle:  # a good call on the new backend
                    pass
            except RuntimeError:
                return  # reuse refused: fine
            except BackendStoppedError as exc:
                pytest.fail(f"a call on a live backend failed with a stale stop: {exc!r}")
