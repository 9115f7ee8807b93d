"""Exceptions raised by watchdog_async.

Every exception the library raises on purpose derives from :class:`WatchdogError`::

    WatchdogError
    ├── ConfigError(WatchdogError, ValueError)
    │       a setting or argument is wrong: NaN, negative, wrong type, threshold outside (0, 1],
    │       target at or above the threshold, unknown setting name, bad environment value,
    │       empty address, a process that does not exist. Nothing was changed.
    ├── UnknownBackendError(WatchdogError, LookupError)
    │       no backend is registered at that address.
    ├── DuplicateBackendError(WatchdogError, ValueError)
    │       a backend is already registered at that address.
    ├── CapacityError(WatchdogError)
    │       make_room / evict / acquire could not make room in time (busy backends, pinned ones,
    │       memory that would not fit). ``.evictions`` lists every eviction tried before giving
    │       up; ``.missing_bytes`` how much memory was still missing, where that was asked.
    ├── BackendStoppedError(WatchdogError)
    │       raised in ``busy()`` callers of a backend that is being stopped or was stopped, and by
    │       ``busy()`` at once for a backend chosen for eviction. ``.reason`` says why
    │       (an :class:`EvictionReason`); load the backend again to go on.
    ├── BackendBusyError(WatchdogError)
    │       the backend's wait queue is full (``max_waiting``), or ``wait_timeout`` ran out.
    ├── NvmlUnavailableError(WatchdogError)   (defined in _memory)
    │       ``NvmlProbe()`` cannot use NVML here (no library, no driver, no GPU);
    │       ``default_probe()`` then falls back to system RAM.
    └── SupervisorClosedError(WatchdogError)
            the supervisor is not running: not started yet, or closed (it refuses reuse).

Errors raised by the caller's own code inside ``busy()`` pass through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._events import Eviction, EvictionReason


class WatchdogError(Exception):
    """Base of every error raised by watchdog_async on purpose."""


class ConfigError(WatchdogError, ValueError):
    """A setting or argument is invalid; nothing was changed."""


class UnknownBackendError(WatchdogError, LookupError):
    """No backend is registered at that address."""

    def __init__(self, address: str) -> None:
        super().__init__(f"no backend registered at {address!r}")
        self.address = address


class DuplicateBackendError(WatchdogError, ValueError):
    """A backend is already registered at that address."""

    def __init__(self, address: str) -> None:
        super().__init__(f"a backend is already registered at {address!r}")
        self.address = address


class CapacityError(WatchdogError):
    """Room could not be made in time; ``evictions`` lists what was tried."""

    def __init__(
        self,
        message: str,
        *,
        evictions: tuple[Eviction, ...] = (),
        missing_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.evictions = evictions
        self.missing_bytes = missing_bytes


class BackendStoppedError(WatchdogError):
    """The backend was stopped (or is being stopped) while, or before, the call used it."""

    def __init__(self, address: str, reason: EvictionReason) -> None:
        super().__init__(f"backend {address!r} was stopped ({reason.value})")
        self.address = address
        self.reason = reason


class BackendBusyError(WatchdogError):
    """The backend's wait queue is full, or waiting for a free slot took too long."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"backend {address!r} is busy: {message}")
        self.address = address


class SupervisorClosedError(WatchdogError):
    """The supervisor is not running (not started, or already closed)."""
