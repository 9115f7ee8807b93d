"""watchdog_async: an asyncio-native supervisor for model-serving backends.

Wrap every call to a backend in ``async with sup.busy(address):`` and the supervisor stops hung
backends, unloads idle ones, keeps at most ``max_loaded`` loaded (least recently used out
first), evicts while GPU or system memory is over a threshold, and stops each backend
gracefully, then by signal to its whole process tree.
"""

from loguru import logger

from ._errors import (
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    ConfigError,
    DuplicateBackendError,
    SupervisorClosedError,
    UnknownBackendError,
    WatchdogError,
)
from ._events import BackendStatus, EventStream, Eviction, EvictionReason
from ._memory import (
    DeviceMemory,
    MemoryProbe,
    MemoryReading,
    NvmlProbe,
    NvmlUnavailableError,
    SystemMemoryProbe,
    default_probe,
)
from ._registry import INHERIT, Backend
from ._settings import Settings, parse_duration
from ._supervisor import BusyHandle, Supervisor

logger.disable("watchdog_async")

__all__ = (
    "INHERIT",
    "Backend",
    "BackendBusyError",
    "BackendStatus",
    "BackendStoppedError",
    "BusyHandle",
    "CapacityError",
    "ConfigError",
    "DeviceMemory",
    "DuplicateBackendError",
    "EventStream",
    "Eviction",
    "EvictionReason",
    "MemoryProbe",
    "MemoryReading",
    "NvmlProbe",
    "NvmlUnavailableError",
    "Settings",
    "Supervisor",
    "SupervisorClosedError",
    "SystemMemoryProbe",
    "UnknownBackendError",
    "WatchdogError",
    "default_probe",
    "parse_duration",
)
