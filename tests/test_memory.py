"""Memory probes: NVML against a stand-in for the library, system RAM for real, validation."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml
import pytest

from watchdog_async import _memory
from watchdog_async._memory import (
    DeviceMemory,
    MemoryProbe,
    MemoryReading,
    NvmlProbe,
    NvmlUnavailableError,
    SystemMemoryProbe,
    check_reading,
    default_probe,
)

GIB = 1024**3
MIB = 1024**2
NO_INSTANCE = 0xFFFFFFFF  # what NVML reports for gpuInstanceId without MIG


def nvml_error(code: int) -> Exception:
    """The pynvml exception for an NVML error code (a subclass such as NVMLError_NotSupported)."""
    error: Exception = pynvml.NVMLError(code)
    return error


def proc(pid: int, used: int | None, gpu_instance: int = NO_INSTANCE) -> SimpleNamespace:
    return SimpleNamespace(
        pid=pid, usedGpuMemory=used, gpuInstanceId=gpu_instance, computeInstanceId=NO_INSTANCE
    )


@dataclass
class FakeGpu:
    name: str | bytes
    memory: tuple[int, int] | None = (80 * GIB, 10 * GIB)  # (total, used); None: not supported
    reserved: int = 512 * MIB  # v1 "used" includes it, v2 "used" does not
    # "ok" | "missing" (FunctionNotFound) | "typeerror" (old pynvml) | "unsupported" | "zero"
    v2: str = "ok"
    compute: Sequence[SimpleNamespace] | Exception = ()
    graphics: Sequence[SimpleNamespace] | Exception = ()
    memory_error: Exception | None = None


@dataclass
class FakeNvml:
    """Replaces the NVML functions of the real pynvml module and records the calls."""

    gpus: list[FakeGpu]
    init_error: Exception | None = None
    handle_errors: dict[int, Exception] = field(default_factory=dict)
    inits: int = 0
    shutdowns: int = 0
    memory_calls: list[tuple[str, int]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.handle_errors:
            raise self.handle_errors[index]
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.gpus[handle].name

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        gpu = self.gpus[handle]
        if version is not None:
            assert version == pynvml.nvmlMemory_v2
            self.memory_calls.append(("v2", handle))
            if gpu.v2 == "missing":
                raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            if gpu.v2 == "typeerror":
                raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword argument")
            if gpu.v2 == "unsupported":
                raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if gpu.v2 == "zero":
                return SimpleNamespace(total=0, used=0, free=0)
        else:
            self.memory_calls.append(("v1", handle))
        if gpu.memory_error is not None:
            raise gpu.memory_error
        if gpu.memory is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        total, used = gpu.memory
        if version is None:
            used += gpu.reserved
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return self._procs(self.gpus[handle].compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return self._procs(self.gpus[handle].graphics)

    @staticmethod
    def _procs(procs: Sequence[SimpleNamespace] | Exception) -> list[SimpleNamespace]:
        if isinstance(procs, Exception):
            raise procs
        return list(procs)


@pytest.fixture(autouse=True)
def fresh_nvml_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with NVML not initialised by this module."""
    monkeypatch.setattr(_memory, "_nvml_users", 0)


@pytest.fixture
def fake_ram(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    ram = SimpleNamespace(total=128 * GIB, available=100 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: ram)
    return ram


def install(monkeypatch: pytest.MonkeyPatch, *gpus: FakeGpu, **kwargs: Any) -> FakeNvml:
    return FakeNvml(list(gpus), **kwargs).install(monkeypatch)


@pytest.fixture
def probes() -> Iterator[list[NvmlProbe]]:
    """Probes made in a test; closed at its end."""
    made: list[NvmlProbe] = []
    yield made
    for probe in made:
        probe.close()


# --- DeviceMemory ---------------------------------------------------------------------------


def test_device_memory_free_and_fraction() -> None:
    device = DeviceMemory(0, "gpu", total=100, used=25)
    assert device.free == 75
    assert device.fraction == 0.25
    assert device.kind == "gpu"
    assert device.processes is None
    assert DeviceMemory(0, "odd", total=100, used=120).free == 0
    assert DeviceMemory(0, "empty", total=0, used=0).fraction == 0.0


def test_device_memory_is_frozen_and_hashable_with_processes() -> None:
    device = DeviceMemory(1, "gpu", 10, 5, "gpu", {7: 5})
    with pytest.raises(AttributeError):
        device.used = 1  # type: ignore[misc]
    assert hash(device) == hash(DeviceMemory(1, "gpu", 10, 5, "gpu", {7: 5}))
    assert hash(MemoryReading((device,))) == hash(MemoryReading((device,)))


# --- NvmlProbe against a stand-in -------------------------------------------------------------


def test_two_gpus_with_processes(monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]) -> None:
    nvml = install(
        monkeypatch,
        FakeGpu(
            b"NVIDIA H100 80GB HBM3",
            memory=(80 * GIB, 30 * GIB),
            compute=[proc(100, 20 * GIB), proc(101, None), proc(103, 2 * GIB)],
            # 100 is a C+G process: NVML lists it in both with the same figure, counted once.
            graphics=[proc(100, 20 * GIB), proc(102, GIB)],
        ),
        FakeGpu(
            "NVIDIA L4",
            memory=(24 * GIB, 6 * GIB),
            # one process in two MIG instances: both instances' memory adds up
            compute=[proc(200, 2 * GIB, gpu_instance=1), proc(200, 3 * GIB, gpu_instance=2)],
        ),
    )
    probe = NvmlProbe()
    probes.append(probe)
    assert probe.description == "NVML: 2 GPU(s)"
    assert isinstance(probe, MemoryProbe)

    reading = probe.read()

    assert check_reading(reading) is None
    # 101: usage unknown, left out; 100: C+G, counted once; 200: two MIG instances, added
    first = {100: 20 * GIB, 102: GIB, 103: 2 * GIB}
    assert reading == MemoryReading(
        (
            DeviceMemory(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 30 * GIB, "gpu", first),
            DeviceMemory(1, "NVIDIA L4", 24 * GIB, 6 * GIB, "gpu", {200: 5 * GIB}),
        )
    )
    assert isinstance(reading.devices[0].name, str)
    assert nvml.inits == 1
    assert {kind for kind, _ in nvml.memory_calls} == {"v2"}


def test_graphics_list_missing_or_failing_keeps_compute_list(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    install(
        monkeypatch,
        FakeGpu("a", compute=[proc(1, GIB)], graphics=nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)),
        FakeGpu("b", compute=[proc(2, GIB)]),
    )
    probes.append(probe := NvmlProbe())
    assert [d.processes for d in probe.read().devices] == [{1: GIB}, {2: GIB}]

    monkeypatch.delattr(pynvml, "nvmlDeviceGetGraphicsRunningProcesses")
    assert [d.processes for d in probe.read().devices] == [{1: GIB}, {2: GIB}]


def test_process_list_failing_gives_unknown_processes(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    install(
        monkeypatch,
        FakeGpu("a", compute=nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)),
        FakeGpu("b", compute=[]),
    )
    probes.append(probe := NvmlProbe())
    first, second = probe.read().devices
    assert first.processes is None
    assert first.used == 10 * GIB  # memory still read
    assert second.processes == {}  # known: nothing running


def test_process_list_falls_back_to_v2_on_an_older_driver(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    install(monkeypatch, FakeGpu("a"))

    def too_new(handle: int) -> list[SimpleNamespace]:
        raise pynvml.NVMLLibraryMismatchError("use nvmlDeviceGetComputeRunningProcesses_v2")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", too_new)
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetComputeRunningProcesses_v2", lambda handle: [proc(5, GIB)]
    )
    probes.append(probe := NvmlProbe())
    assert probe.read().devices[0].processes == {5: GIB}


def test_unified_memory_device_reads_system_ram(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe], fake_ram: SimpleNamespace
) -> None:
    nvml = install(
        monkeypatch,
        FakeGpu("NVIDIA GB10", memory=None, compute=[proc(42, 3 * GIB), proc(43, None)]),
    )
    probes.append(probe := NvmlProbe())
    assert "unified" in probe.description

    (device,) = probe.read().devices

    assert device == DeviceMemory(0, "NVIDIA GB10", 128 * GIB, 28 * GIB, "unified", {42: 3 * GIB})
    assert check_reading(MemoryReading((device,))) is None
    # the mode is remembered: later reads do not ask NVML for device memory again
    calls = len(nvml.memory_calls)
    fake_ram.available = 64 * GIB
    assert probe.read().devices[0].used == 64 * GIB
    assert len(nvml.memory_calls) == calls


@pytest.mark.parametrize("v2", ["missing", "typeerror", "unsupported", "zero"])
def test_memory_info_v1_when_v2_unavailable(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe], v2: str
) -> None:
    nvml = install(monkeypatch, FakeGpu("old", memory=(16 * GIB, 4 * GIB), v2=v2))
    probes.append(probe := NvmlProbe())

    (device,) = probe.read().devices

    assert (device.kind, device.total, device.used) == ("gpu", 16 * GIB, 4 * GIB + 512 * MIB)
    probe.read()
    assert nvml.memory_calls.count(("v2", 0)) == 1  # tried once, then v1 only
    assert nvml.memory_calls.count(("v1", 0)) == 3


def test_gpu_reporting_no_memory_of_its_own_is_unified(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe], fake_ram: SimpleNamespace
) -> None:
    install(monkeypatch, FakeGpu("integrated", memory=(0, 0), v2="zero"))
    probes.append(probe := NvmlProbe())
    (device,) = probe.read().devices
    assert (device.kind, device.total, device.used) == ("unified", 128 * GIB, 28 * GIB)


def test_memory_info_v1_when_pynvml_has_no_v2(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    nvml = install(monkeypatch, FakeGpu("old", memory=(16 * GIB, 4 * GIB)))
    monkeypatch.delattr(pynvml, "nvmlMemory_v2")
    probes.append(probe := NvmlProbe())
    assert probe.read().devices[0].used == 4 * GIB + 512 * MIB
    assert {kind for kind, _ in nvml.memory_calls} == {"v1"}


def test_a_gpu_that_cannot_be_read_is_left_out(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    lost = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    nvml = install(monkeypatch, FakeGpu("lost", memory_error=lost), FakeGpu("fine"))
    probes.append(probe := NvmlProbe())
    assert [d.name for d in probe.read().devices] == ["fine"]

    nvml.gpus[1].memory_error = lost
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        probe.read()


def test_a_gpu_without_handle_is_skipped(
    monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]
) -> None:
    install(
        monkeypatch,
        FakeGpu("hidden"),
        FakeGpu("visible"),
        handle_errors={0: nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)},
    )
    probes.append(probe := NvmlProbe())
    assert probe.description == "NVML: 1 GPU(s)"
    assert [(d.index, d.name) for d in probe.read().devices] == [(1, "visible")]


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "NVML Shared Library Not Found"),
        (nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "Driver Not Loaded"),
        (nvml_error(pynvml.NVML_ERROR_NO_PERMISSION), "Insufficient Permissions"),
        (OSError("libnvidia-ml.so.1: cannot open shared object file"), "cannot open"),
    ],
    ids=["library-not-found", "driver-not-loaded", "no-permission", "oserror"],
)
def test_nvml_unusable_falls_back_to_system_ram(
    monkeypatch: pytest.MonkeyPatch, error: Exception, text: str
) -> None:
    nvml = install(monkeypatch, FakeGpu("never seen"), init_error=error)
    with pytest.raises(NvmlUnavailableError, match=text) as info:
        NvmlProbe()
    assert info.value.__cause__ is error

    probe = default_probe()

    assert isinstance(probe, SystemMemoryProbe)
    assert probe.description.startswith("system RAM (psutil); NVML not available: ")
    assert text in probe.description
    assert nvml.shutdowns == 0
    assert _memory._nvml_users == 0


def test_pynvml_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NvmlUnavailableError, match="pynvml cannot be imported"):
        NvmlProbe()
    probe = default_probe()
    assert isinstance(probe, SystemMemoryProbe)
    assert "pynvml cannot be imported" in probe.description


def test_no_gpu_is_unavailable_and_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch)
    with pytest.raises(NvmlUnavailableError, match="no GPU"):
        NvmlProbe()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert _memory._nvml_users == 0
    assert isinstance(default_probe(), SystemMemoryProbe)


def test_default_probe_picks_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeGpu("one"))
    probe = default_probe()
    assert isinstance(probe, NvmlProbe)
    with probe:
        assert probe.description == "NVML: 1 GPU(s)"
    assert probe.closed


def test_init_once_per_process_and_balanced_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, FakeGpu("one"))
    made: list[NvmlProbe] = []
    lock = threading.Lock()

    def make() -> None:
        probe = NvmlProbe()
        with lock:
            made.append(probe)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(made) == 8
    assert nvml.inits == 1
    for probe in made[:-1]:
        probe.close()
        probe.close()  # idempotent
    assert nvml.shutdowns == 0
    made[-1].close()
    assert nvml.shutdowns == 1
    assert _memory._nvml_users == 0

    with NvmlProbe():  # a later probe initialises NVML again
        assert nvml.inits == 2
    assert nvml.shutdowns == 2


def test_read_after_close_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeGpu("one"))
    probe = NvmlProbe()
    probe.close()
    with pytest.raises(RuntimeError, match="closed"):
        probe.read()


def test_reads_from_many_threads(monkeypatch: pytest.MonkeyPatch, probes: list[NvmlProbe]) -> None:
    install(monkeypatch, FakeGpu("a", compute=[proc(1, GIB)]), FakeGpu("b", memory=None))
    probes.append(probe := NvmlProbe())
    readings: list[MemoryReading] = []

    def read() -> None:
        for _ in range(50):
            readings.append(probe.read())

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(readings) == 200
    assert all(check_reading(r) is None for r in readings)
    assert {tuple(d.kind for d in r.devices) for r in readings} == {("gpu", "unified")}


# --- SystemMemoryProbe, for real -----------------------------------------------------------------


def test_system_memory_probe_reads_this_machine() -> None:
    probe = SystemMemoryProbe()
    assert probe.description == "system RAM (psutil)"
    assert isinstance(probe, MemoryProbe)

    reading = probe.read()
    vm = psutil.virtual_memory()

    assert check_reading(reading) is None
    (device,) = reading.devices
    assert (device.index, device.name, device.kind, device.processes) == (
        0,
        "system RAM",
        "ram",
        None,
    )
    assert device.total == vm.total
    assert 0 < device.used <= device.total
    assert abs(device.used - (vm.total - vm.available)) <= max(256 * MIB, vm.total // 20)


# --- check_reading ------------------------------------------------------------------------------


def reading_of(*devices: object) -> MemoryReading:
    return MemoryReading(tuple(devices))  # type: ignore[arg-type]


def device(*fields: object) -> DeviceMemory:
    """A DeviceMemory with fields of any type: what a buggy probe could return."""
    return DeviceMemory(*fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reading",
    [
        reading_of(),
        reading_of(DeviceMemory(0, "gpu", 100, 0)),
        reading_of(DeviceMemory(0, "gpu", 100, 100, "gpu", {1: 100})),
        reading_of(DeviceMemory(0, "gpu", 100, 50), DeviceMemory(1, "gpu", 100, 50)),
        reading_of(DeviceMemory(0, "gpu", 100, 50), DeviceMemory(0, "RAM", 100, 50, "ram")),
        reading_of(device(0, "ram", 100.0, 12.5, "ram")),
        reading_of(DeviceMemory(0, "gpu", 100, 50, "gpu", {})),
    ],
    ids=["empty", "idle", "full", "two-gpus", "gpu-and-ram", "floats", "no-processes"],
)
def test_check_reading_accepts(reading: MemoryReading) -> None:
    assert check_reading(reading) is None


@pytest.mark.parametrize(
    ("reading", "problem"),
    [
        (None, "not a MemoryReading"),
        ({"devices": ()}, "not a MemoryReading"),
        (MemoryReading([]), "devices is not a tuple"),  # type: ignore[arg-type]
        (reading_of("gpu"), "not a DeviceMemory at position 0"),
        (reading_of(DeviceMemory(0, "gpu", 100, -1)), "negative used on device 0"),
        (reading_of(DeviceMemory(1, "gpu", -100, 0)), "negative total on device 1"),
        (reading_of(DeviceMemory(1, "gpu", 100, 101)), "used > total on device 1"),
        (reading_of(DeviceMemory(0, "gpu", 0, 0)), "total is 0 on device 0"),
        (
            reading_of(device(2, "gpu", math.nan, 0)),
            "total is not a finite number on device 2",
        ),
        (reading_of(device(0, "gpu", 100, "5")), "used is not a finite number on device 0"),
        (reading_of(device(0, "gpu", 100, True)), "used is not a finite number on device 0"),
        (reading_of(device(0, "gpu", 100, 5, "vram")), "unknown kind 'vram' on device 0"),
        (reading_of(device("0", "gpu", 100, 5)), "device index is not an int: '0'"),
        (
            reading_of(DeviceMemory(0, "a", 100, 5), DeviceMemory(0, "b", 100, 5)),
            "duplicate gpu device 0",
        ),
        (reading_of(device(0, "gpu", 100, 5, "gpu", [1])), "processes is not a mapping"),
        (
            reading_of(DeviceMemory(3, "gpu", 100, 5, "gpu", {1: -5})),
            "bad process entry on device 3",
        ),
        (reading_of(device(3, "gpu", 100, 5, "gpu", {"1": 5})), "bad process entry"),
    ],
)
def test_check_reading_rejects(reading: object, problem: str) -> None:
    found = check_reading(reading)
    assert found is not None
    assert found.startswith(problem)


# --- real NVML ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_nvml_readings_are_sane() -> None:
    try:
        probe = NvmlProbe()
    except NvmlUnavailableError as exc:
        pytest.skip(f"NVML not available: {exc}")
    with probe:
        assert probe.description.startswith("NVML: ")
        for _ in range(3):
            reading = probe.read()
            assert check_reading(reading) is None
            assert reading.devices
            for device in reading.devices:
                assert device.kind in ("gpu", "unified")
                assert device.name
                assert 0 < device.used <= device.total
                if device.processes is not None:
                    assert all(pid > 0 and size >= 0 for pid, size in device.processes.items())
    assert _memory._nvml_users == 0
