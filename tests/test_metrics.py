"""watchdog_async.metrics: gauges read from the supervisor at scrape time, counters fed by its
event stream, memory from a probe read off the event loop. Every test uses its own registry and
parses the exposition text as Prometheus would.
"""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from watchdog_async import (
    ConfigError,
    DeviceMemory,
    Eviction,
    EvictionReason,
    MemoryReading,
    Supervisor,
)
from watchdog_async.metrics import SupervisorMetrics
from watchdog_async.testing import ManualClock, ScriptedProbe, gib, settle

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def families(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


GPU = DeviceMemory(0, "Fake GPU", total=gib(24), used=gib(6), kind="gpu")
RAM = DeviceMemory(1, "system RAM", total=gib(64), used=gib(16), kind="ram")


async def test_gauges_come_from_the_snapshot_at_scrape_time() -> None:
    registry = CollectorRegistry()
    async with Supervisor(max_loaded=4, clock=ManualClock()) as sup:
        metrics = SupervisorMetrics(sup, registry=registry)
        sup.register("a1", "a")
        sup.register("a2", "a")
        sup.register("b1", "b")
        async with sup.busy("a1"), sup.busy("a2"), sup.busy("a2"):
            samples = parse(await metrics.render())
            assert value(samples, "watchdog_backends_loaded") == 3
            assert value(samples, "watchdog_max_loaded") == 4
            assert value(samples, "watchdog_inflight_calls", model="a") == 3
            assert value(samples, "watchdog_inflight_calls", model="b") == 0
            assert value(samples, "watchdog_waiting_calls", model="a") == 0
        samples = parse(generate_latest(registry))  # a plain scrape on the loop works too
        assert value(samples, "watchdog_inflight_calls", model="a") == 0
        metrics.close()


async def test_names_and_types_follow_prometheus_conventions() -> None:
    registry = CollectorRegistry()
    async with Supervisor() as sup:
        metrics = SupervisorMetrics(sup, registry=registry, memory_probe=ScriptedProbe([GPU]))
        text = await metrics.render()
        metrics.close()
    assert families(text) == {
        "watchdog_backends_loaded": "gauge",
        "watchdog_max_loaded": "gauge",
        "watchdog_inflight_calls": "gauge",
        "watchdog_waiting_calls": "gauge",
        "watchdog_evictions": "counter",  # exposed as watchdog_evictions_total
        "watchdog_stop_duration_seconds": "histogram",
        "watchdog_faults": "counter",
        "watchdog_metrics_events_dropped": "counter",
        "watchdog_memory_used_bytes": "gauge",
        "watchdog_memory_total_bytes": "gauge",
    }
    samples = parse(text)
    for reason in EvictionReason:  # every series exists from the start, at 0
        for ok in ("true", "false"):
            assert value(samples, "watchdog_evictions_total", reason=reason.value, ok=ok) == 0


async def test_evictions_are_counted_from_the_event_stream() -> None:
    registry = CollectorRegistry()
    async with (
        Supervisor(clock=ManualClock()) as sup,
        SupervisorMetrics(sup, registry=registry) as metrics,
    ):
        sup.register("a1", "a")
        sup.register("b1", "b")
        first = await sup.evict("a1")
        await sup.evict("b1")
        await anyio.wait_all_tasks_blocked()
        samples = parse(await metrics.render())
    assert value(samples, "watchdog_evictions_total", reason="manual", ok="true") == 2
    assert value(samples, "watchdog_evictions_total", reason="lru", ok="true") == 0
    assert value(samples, "watchdog_stop_duration_seconds_count", reason="manual") == 2
    assert value(samples, "watchdog_stop_duration_seconds_bucket", reason="manual", le="+Inf") == 2
    total = value(samples, "watchdog_stop_duration_seconds_sum", reason="manual")
    assert total is not None and total >= first.duration
    assert value(samples, "watchdog_backends_loaded") == 0


async def test_observe_fills_the_histogram_buckets_and_skips_exits() -> None:
    registry = CollectorRegistry()
    async with Supervisor() as sup:
        metrics = SupervisorMetrics(sup, registry=registry, buckets=(0.25, 0.5, 1.0))
        metrics.observe(Eviction("a1", "a", EvictionReason.LRU, ok=False, duration=0.3))
        metrics.observe(Eviction("a2", "a", EvictionReason.LRU, ok=True, duration=0.25))
        metrics.observe(Eviction("a3", "a", EvictionReason.EXITED, ok=True))
        samples = parse(await metrics.render())
        metrics.close()
    bucket = "watchdog_stop_duration_seconds_bucket"
    assert value(samples, bucket, reason="lru", le="0.25") == 1  # le: "less than or equal"
    assert value(samples, bucket, reason="lru", le="0.5") == 2
    assert value(samples, bucket, reason="lru", le="1.0") == 2
    assert value(samples, bucket, reason="lru", le="+Inf") == 2
    assert value(samples, "watchdog_stop_duration_seconds_sum", reason="lru") == pytest.approx(0.55)
    assert value(samples, "watchdog_evictions_total", reason="lru", ok="false") == 1
    assert value(samples, "watchdog_evictions_total", reason="exited", ok="true") == 1
    assert value(samples, "watchdog_stop_duration_seconds_count", reason="exited") is None


async def test_closing_evictions_are_counted_and_run_ends_with_the_supervisor() -> None:
    registry = CollectorRegistry()
    sup = Supervisor()
    metrics = SupervisorMetrics(sup, registry=registry)  # before the supervisor starts
    assert value(parse(generate_latest(registry)), "watchdog_backends_loaded") == 0
    async with anyio.create_task_group() as tg, sup:  # the task group waits for run()...
        await tg.start(metrics.run)
        sup.register("a1", "a")
    # ...which returned by itself: the supervisor closed its event stream
    samples = parse(generate_latest(registry))
    assert value(samples, "watchdog_evictions_total", reason="closing", ok="true") == 1
    metrics.close()


async def test_memory_comes_from_the_probe_read_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def read() -> MemoryReading:
        threads.append(threading.get_ident())
        return MemoryReading((GPU, RAM))

    registry = CollectorRegistry()
    async with Supervisor() as sup:
        metrics = SupervisorMetrics(sup, registry=registry, memory_probe=ScriptedProbe(read))
        samples = parse(await metrics.render())
        metrics.close()
    assert threads and loop_thread not in threads
    gpu = {"device": "0", "name": "Fake GPU", "kind": "gpu"}
    ram = {"device": "1", "name": "system RAM", "kind": "ram"}
    assert value(samples, "watchdog_memory_used_bytes", **gpu) == gib(6)
    assert value(samples, "watchdog_memory_total_bytes", **gpu) == gib(24)
    assert value(samples, "watchdog_memory_used_bytes", **ram) == gib(16)
    assert value(samples, "watchdog_memory_total_bytes", **ram) == gib(64)


async def test_without_a_probe_memory_is_the_supervisors_last_reading() -> None:
    registry = CollectorRegistry()
    probe = ScriptedProbe([GPU])
    async with Supervisor(memory_threshold=0.9, memory_probe=probe, clock=ManualClock()) as sup:
        metrics = SupervisorMetrics(sup, registry=registry)
        samples = parse(await metrics.render())
        assert not [k for k in samples if k[0].startswith("watchdog_memory")]  # none taken yet
        await sup.check()  # the reclaimer reads memory
        reads = probe.reads
        samples = parse(await metrics.render())
        assert probe.reads == reads  # scraping did not read the probe again
        gpu = {"device": "0", "name": "Fake GPU", "kind": "gpu"}
        assert value(samples, "watchdog_memory_used_bytes", **gpu) == gib(6)
        # from another thread too
        text = await anyio.to_thread.run_sync(generate_latest, registry)
        assert value(parse(text), "watchdog_memory_total_bytes", **gpu) == gib(24)
        metrics.close()


async def test_a_failing_or_hanging_probe_costs_the_memory_figures_only() -> None:
    registry = CollectorRegistry()
    probe = ScriptedProbe([GPU])
    async with Supervisor() as sup:
        metrics = SupervisorMetrics(sup, registry=registry, memory_probe=probe, probe_timeout=0.05)
        probe.error = RuntimeError("NVML went away")
        samples = parse(await metrics.render())
        assert value(samples, "watchdog_backends_loaded") == 0
        assert not [k for k in samples if k[0].startswith("watchdog_memory")]
        probe.error = None
        probe.hang = 0.3
        with anyio.fail_after(0.25):  # bounded by probe_timeout, not by the hang
            samples = parse(await metrics.render())
        assert not [k for k in samples if k[0].startswith("watchdog_memory")]
        reads = probe.reads
        await metrics.render()  # the hung read is still running: no second thread piles up
        assert probe.reads == reads
        metrics.close()


async def test_a_scrape_from_another_thread_reads_the_supervisor_on_its_loop() -> None:
    registry = CollectorRegistry()
    probe = ScriptedProbe([GPU])
    async with (
        Supervisor() as sup,
        SupervisorMetrics(sup, registry=registry, memory_probe=probe),
    ):
        sup.register("a1", "a")
        async with sup.busy("a1"):
            # what prometheus_client.start_http_server does: scrape from its own thread
            text = await anyio.to_thread.run_sync(generate_latest, registry)
    samples = parse(text)
    assert value(samples, "watchdog_inflight_calls", model="a") == 1
    assert value(samples, "watchdog_memory_used_bytes", device="0", name="Fake GPU", kind="gpu")


async def test_faults_are_exposed_by_kind() -> None:
    registry = CollectorRegistry()
    probe = ScriptedProbe([GPU])
    probe.error = RuntimeError("broken")
    async with Supervisor(memory_threshold=0.9, memory_probe=probe, clock=ManualClock()) as sup:
        metrics = SupervisorMetrics(sup, registry=registry)
        await sup.check()
        await settle(sup)
        samples = parse(await metrics.render())
        metrics.close()
    assert value(samples, "watchdog_faults_total", kind="memory probe: RuntimeError") == 1


async def test_a_custom_registry_and_namespace_leave_the_global_registry_alone() -> None:
    registry = CollectorRegistry()
    async with Supervisor() as sup:
        async with SupervisorMetrics(sup, registry=registry, namespace="llm") as metrics:
            samples = parse(await metrics.render())
            assert value(samples, "llm_backends_loaded") == 0
            assert value(samples, "watchdog_backends_loaded") is None
            assert REGISTRY.get_sample_value("llm_backends_loaded") is None
        # leaving unregistered it: a new collector may take the same names
        assert value(parse(generate_latest(registry)), "llm_backends_loaded") is None
        again = SupervisorMetrics(sup, registry=registry, namespace="llm")
        with pytest.raises(ValueError, match="Duplicated"):
            SupervisorMetrics(sup, registry=registry, namespace="llm")
        again.close()
        again.close()  # idempotent


async def test_registering_does_not_scrape_the_supervisor() -> None:
    class Counting(Supervisor):
        snapshots = 0

        def snapshot(self) -> list[object]:  # type: ignore[override]
            Counting.snapshots += 1
            return []

    sup = Counting()
    metrics = SupervisorMetrics(sup, registry=CollectorRegistry(auto_describe=True))
    assert Counting.snapshots == 0
    metrics.close()


async def test_arguments_are_checked() -> None:
    sup = Supervisor()
    with pytest.raises(ConfigError, match="Supervisor"):
        SupervisorMetrics("sup", registry=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="read"):
        SupervisorMetrics(sup, registry=None, memory_probe=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="probe_timeout"):
        SupervisorMetrics(sup, registry=None, probe_timeout=0)
    with pytest.raises(RuntimeError, match="registry"):
        await SupervisorMetrics(sup, registry=None).render()
