"""Memory readings: the probe protocol, NVML and system-RAM probes, and the automatic choice.

A probe's ``read()`` is synchronous and may block (NVML calls, psutil); the supervisor runs it in
a worker thread with a timeout. Every figure is in bytes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, runtime_checkable

import psutil
from loguru import logger

from ._errors import WatchdogError

__all__ = (
    "DeviceKind",
    "DeviceMemory",
    "MemoryProbe",
    "MemoryReading",
    "NvmlProbe",
    "NvmlUnavailableError",
    "SystemMemoryProbe",
    "check_reading",
    "default_probe",
)

DeviceKind = Literal["gpu", "ram", "unified"]
_KINDS: frozenset[str] = frozenset({"gpu", "ram", "unified"})

# NVML error codes (nvml.h); read from pynvml when it has them.
_NOT_SUPPORTED = 3
_FUNCTION_NOT_FOUND = 13
# usedGpuMemory is this (unsigned -1) where the driver cannot tell (WDDM, MIG, some SoCs).
_NOT_AVAILABLE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Memory of one device, in bytes; ``processes`` maps pid to bytes where known."""

    index: int
    name: str
    total: int
    used: int
    kind: DeviceKind = "gpu"
    processes: Mapping[int, int] | None = field(default=None, hash=False)

    @property
    def free(self) -> int:
        """Bytes not in use (never negative)."""
        return max(0, self.total - self.used)

    @property
    def fraction(self) -> float:
        """Share of ``total`` in use; 0.0 when ``total`` is 0."""
        return self.used / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """One reading of every device a probe watches."""

    devices: tuple[DeviceMemory, ...]


@runtime_checkable
class MemoryProbe(Protocol):
    """Anything with a synchronous ``read()`` returning a :class:`MemoryReading`."""

    def read(self) -> MemoryReading:
        """Read every device now (may block; called from a worker thread)."""
        ...


class NvmlUnavailableError(WatchdogError):
    """NVML cannot be used here: no library, no driver, no GPU, or init failed."""


def check_reading(reading: object) -> str | None:
    """None when ``reading`` is usable, else a short text naming what is wrong with it.

    An empty ``devices`` tuple is valid: there is nothing to check.
    """
    if not isinstance(reading, MemoryReading):
        return "not a MemoryReading"
    if not isinstance(reading.devices, tuple):
        return "devices is not a tuple"
    seen: set[tuple[object, object]] = set()
    for position, device in enumerate(reading.devices):
        if not isinstance(device, DeviceMemory):
            return f"not a DeviceMemory at position {position}"
        problem = _check_device(device)
        if problem is not None:
            return problem
        key = (device.kind, device.index)
        if key in seen:
            return f"duplicate {device.kind} device {device.index}"
        seen.add(key)
    return None


def _check_device(device: DeviceMemory) -> str | None:
    index = device.index
    if not _is_int(index):
        return f"device index is not an int: {index!r}"
    if device.kind not in _KINDS:
        return f"unknown kind {device.kind!r} on device {index}"
    for label in ("total", "used"):
        value = getattr(device, label)
        if not _is_number(value):
            return f"{label} is not a finite number on device {index}"
        if value < 0:
            return f"negative {label} on device {index}"
    if device.total == 0:
        return f"total is 0 on device {index}"
    if device.used > device.total:
        return f"used > total on device {index}"
    processes = device.processes
    if processes is None:
        return None
    if not isinstance(processes, Mapping):
        return f"processes is not a mapping on device {index}"
    for pid, size in processes.items():
        if not _is_int(pid) or not _is_number(size) or size < 0:
            return f"bad process entry on device {index}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


# --- system RAM -------------------------------------------------------------------------------


class SystemMemoryProbe:
    """System RAM from psutil: one device, index 0, kind ``"ram"``."""

    __slots__ = ("_reason",)

    def __init__(self, *, reason: str | None = None) -> None:
        """``reason``: why RAM is watched instead of a GPU (shown in :attr:`description`)."""
        self._reason = reason

    @property
    def description(self) -> str:
        """What this probe reads, and why it was chosen when that is known."""
        if self._reason:
            return f"system RAM (psutil); NVML not available: {self._reason}"
        return "system RAM (psutil)"

    def read(self) -> MemoryReading:
        """Total and used RAM (used = total - available)."""
        total, used = _ram()
        return MemoryReading((DeviceMemory(0, "system RAM", total, used, "ram"),))

    def __repr__(self) -> str:
        return f"SystemMemoryProbe({self.description!r})"


def _ram() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    total = int(vm.total)
    return total, max(0, total - int(vm.available))


# --- NVML ---------------------------------------------------------------------------------------

_nvml_lock = threading.Lock()
_nvml_users = 0  # open NvmlProbe instances; nvmlInit on 0 -> 1, nvmlShutdown on 1 -> 0


def _import_nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailableError(f"pynvml cannot be imported: {exc}") from exc
    return pynvml


def _nvml_errors(nvml: Any) -> tuple[type[BaseException], ...]:
    """Exceptions that mean an NVML call failed (not a bug in this module)."""
    errors: list[type[BaseException]] = [nvml.NVMLError, OSError]
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    if isinstance(mismatch, type) and issubclass(mismatch, BaseException):
        errors.append(mismatch)
    return tuple(errors)


def _nvml_acquire(nvml: Any) -> None:
    global _nvml_users
    with _nvml_lock:
        if _nvml_users == 0:
            nvml.nvmlInit()
            logger.debug("NVML initialised")
        _nvml_users += 1


def _nvml_release(nvml: Any) -> None:
    global _nvml_users
    with _nvml_lock:
        if _nvml_users == 0:
            return
        _nvml_users -= 1
        if _nvml_users == 0:
            try:
                nvml.nvmlShutdown()
            except _nvml_errors(nvml) as exc:
                logger.debug("nvmlShutdown failed: {!r}", exc)
            else:
                logger.debug("NVML shut down")


def _code(nvml: Any, exc: BaseException, name: str, default: int) -> bool:
    """True when ``exc`` is an NVMLError with the code ``NVML_ERROR_<name>``."""
    return isinstance(exc, nvml.NVMLError) and getattr(exc, "value", None) == getattr(
        nvml, f"NVML_ERROR_{name}", default
    )


def _why(exc: BaseException) -> str:
    text = str(exc)
    kind = type(exc).__name__
    return f"{kind}: {text}" if text else kind


def _figures(info: Any) -> tuple[int, int] | None:
    """(total, used) of an NVML memory record; None when it reports no memory (integrated GPU)."""
    total = int(info.total)
    return (total, int(info.used)) if total > 0 else None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Gpu:
    """One NVML device: handle, name, and how its memory is read (found on first read)."""

    __slots__ = ("handle", "index", "mode", "name")

    def __init__(self, index: int, handle: object, name: str) -> None:
        self.index = index
        self.handle = handle
        self.name = name
        self.mode: Literal["v2", "v1", "unified"] | None = None


class NvmlProbe:
    """GPU memory from NVML, one :class:`DeviceMemory` per GPU, with per-process figures.

    A GPU whose memory NVML reports as not supported, or as 0 bytes (unified memory: GB10,
    Jetson), is read as kind ``"unified"`` with system RAM figures. Usable from any thread;
    call :meth:`close` (or use it as a context manager) to release NVML.
    """

    def __init__(self) -> None:
        """Initialise NVML (once per process) and find the GPUs.

        Raises :class:`NvmlUnavailableError` when NVML cannot be used or sees no GPU.
        """
        self._closed = True
        self._close_lock = threading.Lock()
        nvml = _import_nvml()
        errors = _nvml_errors(nvml)
        self._nvml = nvml
        self._errors = errors
        try:
            _nvml_acquire(nvml)
        except errors as exc:
            raise NvmlUnavailableError(_why(exc)) from exc
        self._closed = False
        try:
            self._gpus = self._find_gpus()
        except BaseException:
            self.close()
            raise
        self._describe_modes()

    def _find_gpus(self) -> tuple[_Gpu, ...]:
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._errors as exc:
            raise NvmlUnavailableError(_why(exc)) from exc
        gpus: list[_Gpu] = []
        failure: BaseException | None = None
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except self._errors as exc:
                logger.debug("NVML device {} skipped: {!r}", index, exc)
                failure = exc
                continue
            gpus.append(_Gpu(index, handle, name))
        if not gpus:
            reason = "no GPU found" if failure is None else f"no usable GPU ({_why(failure)})"
            raise NvmlUnavailableError(reason)
        return tuple(gpus)

    def _describe_modes(self) -> None:
        for gpu in self._gpus:
            try:
                self._memory(gpu)
            except self._errors as exc:
                logger.debug("NVML device {} memory not read yet: {!r}", gpu.index, exc)

    @property
    def description(self) -> str:
        """What this probe reads, e.g. ``"NVML: 2 GPU(s)"``."""
        text = f"NVML: {len(self._gpus)} GPU(s)"
        unified = sum(1 for gpu in self._gpus if gpu.mode == "unified")
        if unified:
            text += f", {unified} with unified memory (read as system RAM)"
        return text

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def read(self) -> MemoryReading:
        """One :class:`DeviceMemory` per GPU.

        A GPU whose memory cannot be read is left out (logged at debug); when none can be read
        the first error is raised.
        """
        if self._closed:
            raise RuntimeError("NvmlProbe is closed")
        devices: list[DeviceMemory] = []
        failure: BaseException | None = None
        for gpu in self._gpus:
            try:
                devices.append(self._read_gpu(gpu))
            except self._errors as exc:
                logger.debug("NVML device {} not read: {!r}", gpu.index, exc)
                if failure is None:
                    failure = exc
        if failure is not None and not devices:
            raise failure
        return MemoryReading(tuple(devices))

    def _read_gpu(self, gpu: _Gpu) -> DeviceMemory:
        figures = self._memory(gpu)
        kind: DeviceKind = "gpu"
        if figures is None:
            kind = "unified"
            figures = _ram()
        total, used = figures
        return DeviceMemory(gpu.index, gpu.name, total, used, kind, self._processes(gpu))

    def _memory(self, gpu: _Gpu) -> tuple[int, int] | None:
        """(total, used) from NVML, or None for a unified-memory device."""
        if gpu.mode == "unified":
            return None
        figures = self._memory_v2(gpu.handle) if gpu.mode != "v1" else None
        mode: Literal["v2", "v1"] = "v2"
        if figures is None:
            figures, mode = self._memory_v1(gpu.handle), "v1"
        if figures is None:
            logger.debug("NVML device {} has unified memory: reading system RAM", gpu.index)
            gpu.mode = "unified"
            return None
        gpu.mode = mode
        return figures

    def _memory_v2(self, handle: object) -> tuple[int, int] | None:
        """nvmlDeviceGetMemoryInfo v2 ("used" without driver-reserved memory); None if absent."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is None:
            return None
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except TypeError:  # an old pynvml without the version argument
            return None
        except nvml.NVMLError as exc:
            if _code(nvml, exc, "FUNCTION_NOT_FOUND", _FUNCTION_NOT_FOUND) or _code(
                nvml, exc, "NOT_SUPPORTED", _NOT_SUPPORTED
            ):
                return None
            raise
        return _figures(info)

    def _memory_v1(self, handle: object) -> tuple[int, int] | None:
        """nvmlDeviceGetMemoryInfo v1; None when not supported (unified memory)."""
        nvml = self._nvml
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            if _code(nvml, exc, "NOT_SUPPORTED", _NOT_SUPPORTED):
                return None
            raise
        return _figures(info)

    def _processes(self, gpu: _Gpu) -> dict[int, int] | None:
        """{pid: bytes} from the compute and graphics lists; None when the compute list fails.

        A process in both lists (type C+G) is one process: its figure is taken once, not added.
        Entries whose usage NVML cannot tell are left out.
        """
        try:
            compute = self._running("nvmlDeviceGetComputeRunningProcesses", gpu.handle)
        except self._errors as exc:
            logger.debug("NVML device {} processes unknown: {!r}", gpu.index, exc)
            return None
        try:
            graphics = self._running("nvmlDeviceGetGraphicsRunningProcesses", gpu.handle)
        except self._errors as exc:
            logger.debug("NVML device {} graphics processes skipped: {!r}", gpu.index, exc)
            graphics = []
        # One entry per (pid, GPU instance, compute instance): MIG instances of one pid add up.
        entries: dict[tuple[int, object, object], int] = {}
        for proc in (*compute, *graphics):
            pid: object = getattr(proc, "pid", None)
            size: object = getattr(proc, "usedGpuMemory", None)
            if not isinstance(pid, int) or not isinstance(size, int):
                continue  # None: usage not available
            if not 0 <= size < _NOT_AVAILABLE:
                continue
            instance = (
                getattr(proc, "gpuInstanceId", None),
                getattr(proc, "computeInstanceId", None),
            )
            key = (pid, *instance)
            entries[key] = max(entries.get(key, 0), size)
        usage: dict[int, int] = {}
        for (pid, _, _), size in entries.items():
            usage[pid] = usage.get(pid, 0) + size
        return usage

    def _running(self, function: str, handle: object) -> list[Any]:
        """Call an NVML running-processes function; [] when this pynvml lacks it."""
        nvml = self._nvml
        call = getattr(nvml, function, None)
        if call is None:
            return []
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        try:
            return list(call(handle))
        except Exception as exc:
            older = getattr(nvml, f"{function}_v2", None)
            if mismatch is None or not isinstance(exc, mismatch) or older is None:
                raise
            return list(older(handle))  # a driver older than pynvml's default version

    def close(self) -> None:
        """Release NVML (shut down when the last probe closes); idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _nvml_release(self._nvml)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"NvmlProbe({self.description!r}, {state})"


def default_probe() -> MemoryProbe:
    """NVML when it initialises with at least one GPU, else system RAM (saying why)."""
    try:
        probe = NvmlProbe()
    except NvmlUnavailableError as exc:
        logger.debug("NVML not available, watching system RAM: {}", exc)
        return SystemMemoryProbe(reason=str(exc))
    logger.debug("memory probe: {}", probe.description)
    return probe
