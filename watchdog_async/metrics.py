"""Prometheus metrics for a Supervisor. Needs the ``metrics`` extra (prometheus-client).

Usage (one supervisor, its own registry, ``/metrics`` served by your app)::

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
    from watchdog_async.metrics import SupervisorMetrics

    registry = CollectorRegistry()
    async with Supervisor(max_loaded=2) as sup:
        async with SupervisorMetrics(sup, registry=registry) as metrics:
            ...
        # in the /metrics handler:
        body = await metrics.render()  # bytes, media type CONTENT_TYPE_LATEST

Gauges are read from ``sup.snapshot()`` when Prometheus scrapes; eviction counters and the stop
duration histogram are fed by the supervisor's ``events()`` stream, which this object reads in
a task while it is entered (or while ``await tg.start(metrics.run)`` runs). Memory figures
come from the supervisor's last reading (``sup.memory_reading``: taken every ``check_interval``
while ``memory_threshold`` is set), or, when a ``memory_probe`` is given, from that probe read at
scrape time in a worker thread (never on the event loop).

================================================  =========  ================================
name                                              type       labels
================================================  =========  ================================
``watchdog_backends_loaded``                      gauge
``watchdog_max_loaded`` (0 = unlimited)           gauge
``watchdog_inflight_calls``                       gauge      model
``watchdog_waiting_calls``                        gauge      model
``watchdog_evictions_total``                      counter    reason, ok
``watchdog_stop_duration_seconds``                histogram  reason
``watchdog_memory_used_bytes``                    gauge      device, name, kind
``watchdog_memory_total_bytes``                   gauge      device, name, kind
``watchdog_faults_total``                         counter    kind
``watchdog_metrics_events_dropped_total``         counter
================================================  =========  ================================

``prometheus_client.start_http_server`` works too: it scrapes from its own thread, and the
snapshot is then taken on the supervisor's event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._errors import ConfigError, SupervisorClosedError
from ._events import BackendStatus, EventStream, Eviction, EvictionReason
from ._memory import MemoryProbe, MemoryReading, check_reading
from ._supervisor import Supervisor

__all__ = ("STOP_DURATION_BUCKETS", "SupervisorMetrics")

STOP_DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"),
)  # fmt: skip
"""Default buckets of ``watchdog_stop_duration_seconds`` (a stop may wait stop_timeout twice)."""

_HOP_TIMEOUT = 5.0  # seconds a scrape from another thread waits for the event loop


class _Scrape:
    """What one scrape reads from the supervisor (on its event loop)."""

    __slots__ = ("faults", "max_loaded", "memory", "statuses")

    def __init__(self, sup: Supervisor) -> None:
        try:
            self.statuses: list[BackendStatus] = sup.snapshot()
        except SupervisorClosedError:  # not started yet: nothing loaded
            self.statuses = []
        self.max_loaded: int = sup.settings.max_loaded
        self.faults: dict[str, int] = sup.faults
        self.memory: MemoryReading | None = sup.memory_reading


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.5``, ``10.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _Histogram:
    """Observations of one label set: a count per bucket (not cumulative) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0

    def observe(self, bounds: Sequence[float], value: float) -> None:
        self.counts[bisect.bisect_left(bounds, value)] += 1
        self.total += value


class SupervisorMetrics(Collector):
    """A Prometheus collector bound to one :class:`Supervisor`.

    It registers itself in ``registry`` (default: prometheus_client's global registry; pass
    ``registry=None`` to register it yourself) and subscribes to ``sup.events()`` at once, so
    no eviction is missed before :meth:`run` starts reading them. ``namespace`` prefixes every
    name (default ``watchdog``). ``memory_probe``: read at scrape time (in a worker thread,
    bounded by ``probe_timeout`` seconds) for the memory gauges; without one they show the
    supervisor's last reading, if it took one.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "watchdog",
        memory_probe: MemoryProbe | None = None,
        probe_timeout: float = 5.0,
        buckets: Sequence[float] = STOP_DURATION_BUCKETS,
    ) -> None:
        if not isinstance(supervisor, Supervisor):
            raise ConfigError(f"supervisor must be a Supervisor, got {supervisor!r}")
        if memory_probe is not None and not callable(getattr(memory_probe, "read", None)):
            raise ConfigError(f"memory_probe must have a read() method, got {memory_probe!r}")
        if not probe_timeout > 0:
            raise ConfigError(f"probe_timeout must be > 0 seconds, got {probe_timeout!r}")
        self.supervisor = supervisor
        self.registry = registry
        self._ns = namespace
        self._probe = memory_probe
        self._probe_timeout = float(probe_timeout)
        self._reading: MemoryReading | None = None
        self._reading_lock = threading.Lock()
        self._probe_busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds: tuple[float, ...] = tuple(bounds)
        self._lock = threading.Lock()  # observe() on the loop, collect() maybe in a thread
        self._evictions: dict[tuple[str, str], int] = {
            (reason.value, ok): 0 for reason in EvictionReason for ok in ("true", "false")
        }
        self._durations: dict[str, _Histogram] = {}
        self._stream: EventStream = supervisor.events()
        if registry is not None:
            registry.register(self)

    # -- feeding ----------------------------------------------------------------------------

    def observe(self, eviction: Eviction) -> None:
        """Count one eviction (what :meth:`run` does with each one the supervisor reports)."""
        reason = eviction.reason.value
        with self._lock:
            key = (reason, "true" if eviction.ok else "false")
            self._evictions[key] = self._evictions.get(key, 0) + 1
            if eviction.reason is not EvictionReason.EXITED:  # exited by itself: no stop
                histogram = self._durations.get(reason)
                if histogram is None:
                    histogram = self._durations[reason] = _Histogram(len(self._bounds))
                histogram.observe(self._bounds, max(0.0, eviction.duration))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Count evictions until the supervisor closes (or this task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        task_status.started()
        async for eviction in self._stream:
            self.observe(eviction)

    async def __aenter__(self) -> Self:
        """Start :meth:`run` in a task of its own."""
        if self._task is not None:
            raise RuntimeError("SupervisorMetrics is already entered")
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self.run(), name="watchdog_async metrics")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop counting and unregister from the registry."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self.close()

    def close(self) -> None:
        """Unregister from the registry and stop receiving evictions (idempotent)."""
        self._stream.close()
        if self.registry is not None:
            with contextlib.suppress(KeyError):  # not registered (any more)
                self.registry.unregister(self)

    # -- scraping ---------------------------------------------------------------------------

    async def render(self) -> bytes:
        """The registry's exposition text (``CONTENT_TYPE_LATEST``), for a ``/metrics``
        handler on the event loop: memory is read first in a worker thread."""
        if self.registry is None:
            raise RuntimeError("render() needs the registry this collector is registered in")
        self._loop = asyncio.get_running_loop()
        await self.refresh_memory()
        return generate_latest(self.registry)

    async def refresh_memory(self) -> MemoryReading | None:
        """Read the memory probe now in a worker thread (bounded by ``probe_timeout``); the
        reading, which the next scrape on the event loop reports (None: no reading)."""
        if self._probe is None:
            return None
        with anyio.move_on_after(self._probe_timeout):
            return await anyio.to_thread.run_sync(self._read_probe, abandon_on_cancel=True)
        return None  # the probe hangs: no memory figures in this scrape

    def _read_probe(self) -> MemoryReading | None:
        """Read the probe in this (non-loop) thread; one read at a time; None when it fails."""
        probe = self._probe
        if probe is None:
            return None
        with self._reading_lock:
            if self._probe_busy:  # a previous read hangs: do not pile threads up
                return None
            self._probe_busy = True
        reading: object = None
        try:
            reading = probe.read()
        except Exception:
            reading = None
        finally:
            with self._reading_lock:
                self._probe_busy = False
        if reading is None or check_reading(reading) is not None:
            self._reading = None
            return None
        assert isinstance(reading, MemoryReading)
        self._reading = reading
        return reading

    def _scrape(self) -> tuple[_Scrape | None, MemoryReading | None]:
        """The supervisor's state, read on its event loop, and a memory reading: from our
        probe where one was given, else the supervisor's last one."""
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        if on_loop:  # on the event loop: never block it on the probe; use the last reading
            here = _Scrape(self.supervisor)
            return here, self._reading if self._probe is not None else here.memory
        # the supervisor's loop; its private attribute until it has a public one
        loop = self._loop or self.supervisor.loop
        state: _Scrape | None = None
        if loop is not None and loop.is_running():

            async def take() -> _Scrape:
                return _Scrape(self.supervisor)

            try:
                state = asyncio.run_coroutine_threadsafe(take(), loop).result(_HOP_TIMEOUT)
            except Exception:
                state = None  # the loop is blocked or closing: no supervisor figures now
        elif loop is None:
            state = _Scrape(self.supervisor)  # not started: nothing to race with
        if self._probe is not None:
            return state, self._read_probe()
        return state, None if state is None else state.memory

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (so registering does not scrape)."""
        return list(self._families(None, None))

    def collect(self) -> Iterable[Metric]:
        state, reading = self._scrape()
        return list(self._families(state, reading))

    def _families(self, state: _Scrape | None, reading: MemoryReading | None) -> Iterable[Metric]:
        ns = self._ns
        loaded = GaugeMetricFamily(
            f"{ns}_backends_loaded", "Backends tracked by the supervisor (loaded, or being stopped)"
        )
        limit = GaugeMetricFamily(f"{ns}_max_loaded", "The max_loaded setting (0 = unlimited)")
        inflight = GaugeMetricFamily(
            f"{ns}_inflight_calls", "Calls in flight (inside busy()), by model", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            f"{ns}_waiting_calls",
            "Calls waiting for a slot (max_concurrency), by model",
            labels=["model"],
        )
        faults = CounterMetricFamily(
            f"{ns}_faults",
            "Failures the supervisor met and survived (probe, callback, signal...), by kind",
            labels=["kind"],
        )
        dropped = CounterMetricFamily(
            f"{ns}_metrics_events_dropped",
            "Evictions these metrics missed because their event buffer overflowed",
        )
        used = GaugeMetricFamily(
            f"{ns}_memory_used_bytes",
            "Memory in use on each device the probe watches",
            labels=["device", "name", "kind"],
        )
        total = GaugeMetricFamily(
            f"{ns}_memory_total_bytes",
            "Memory size of each device the probe watches",
            labels=["device", "name", "kind"],
        )
        if state is not None:
            loaded.add_metric([], len(state.statuses))
            limit.add_metric([], state.max_loaded)
            per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for status in state.statuses:
                counts = per_model[status.model]
                counts[0] += status.inflight
                counts[1] += status.waiting
            for model, (calls, waiters) in sorted(per_model.items()):
                inflight.add_metric([model], calls)
                waiting.add_metric([model], waiters)
            for kind, count in sorted(state.faults.items()):
                faults.add_metric([kind], count)
            dropped.add_metric([], self._stream.dropped)
        if reading is not None:
            for device in reading.devices:
                labels = [str(device.index), device.name, device.kind]
                used.add_metric(labels, device.used)
                total.add_metric(labels, device.total)
        yield loaded
        yield limit
        yield inflight
        yield waiting
        evictions = CounterMetricFamily(
            f"{ns}_evictions",
            "Backends evicted, by reason and whether the stop was confirmed (ok)",
            labels=["reason", "ok"],
        )
        durations = HistogramMetricFamily(
            f"{ns}_stop_duration_seconds",
            "Seconds spent stopping one backend (callback, SIGTERM, SIGKILL), by reason",
            labels=["reason"],
        )
        if state is not None:
            with self._lock:
                for (reason, ok), count in self._evictions.items():
                    evictions.add_metric([reason, ok], count)
                for reason, histogram in sorted(self._durations.items()):
                    cumulative, buckets = 0, []
                    for bound, count in zip(self._bounds, histogram.counts, strict=True):
                        cumulative += count
                        buckets.append((_le(bound), cumulative))
                    durations.add_metric([reason], buckets, histogram.total)
        yield evictions
        yield durations
        yield faults
        yield dropped
        yield used
        yield total
