"""LocalAI's model watchdog (``pkg/model/watchdog.go``), ported to Python as written.

The reference design the benchmarks compare :class:`watchdog_async.Supervisor` with: one lock
(``threading.Lock``, as the Go code embeds a ``sync.Mutex``) around five maps, ``Mark`` and
``UnMark`` taking it for every call, no reference counting (two overlapping calls on one address
share one busy timestamp, and the first to end marks the backend idle), and ``EnforceLRULimit``
building and sorting a list of every backend under the lock. Only what the benchmarks use is
ported: the bookkeeping, not the processes or the polling loop.

:class:`PortBusy` wraps ``Mark``/``UnMark`` as an async context manager, which is how a Python
application would put the reference design around its calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ("PortBusy", "WatchDog")


class WatchDog:
    """``type WatchDog struct`` with its maps and its mutex."""

    __slots__ = (
        "_lock",
        "address_map",
        "address_model_map",
        "busy_time",
        "idle_time",
        "idle_timeout",
        "last_used",
        "lru_limit",
        "shutdown_model",
        "timeout",
    )

    def __init__(
        self,
        *,
        shutdown_model: Callable[[str], None],
        busy_timeout: float = 300.0,
        idle_timeout: float = 900.0,
        lru_limit: int = 0,
    ) -> None:
        self._lock = threading.Lock()
        self.busy_time: dict[str, float] = {}
        self.idle_time: dict[str, float] = {}
        self.last_used: dict[str, float] = {}
        self.address_map: dict[str, object] = {}
        self.address_model_map: dict[str, str] = {}
        self.timeout = busy_timeout
        self.idle_timeout = idle_timeout
        self.lru_limit = lru_limit
        self.shutdown_model = shutdown_model

    def add_address_model_map(self, address: str, model: str) -> None:
        with self._lock:
            self.address_model_map[address] = model

    def add(self, address: str, process: object) -> None:
        with self._lock:
            self.address_map[address] = process

    def mark(self, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            self.busy_time[address] = now
            self.last_used[address] = now  # Update LRU tracking
            self.idle_time.pop(address, None)

    def unmark(self, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            self.busy_time.pop(address, None)
            self.idle_time[address] = now
            self.last_used[address] = now  # Update LRU tracking

    def update_last_used(self, address: str) -> None:
        with self._lock:
            self.last_used[address] = time.monotonic()

    def get_loaded_model_count(self) -> int:
        with self._lock:
            return len(self.address_model_map)

    def enforce_lru_limit(self, pending_loads: int) -> int:
        """Evict least recently used models until one more load fits; the number evicted."""
        if self.lru_limit <= 0:
            return 0
        self._lock.acquire()
        current = len(self.address_model_map)
        to_evict = current - self.lru_limit + pending_loads + 1
        if to_evict <= 0:
            self._lock.release()
            return 0
        # Build a list of models sorted by last used time (oldest first)
        models = [
            (self.last_used.get(address, 0.0), address, model)
            for address, model in self.address_model_map.items()
        ]
        models.sort(key=lambda m: m[0])
        shutdown: list[str] = []
        for _, address, model in models[:to_evict]:
            shutdown.append(model)
            self._untrack(address)
        self._lock.release()
        # Now shutdown models without holding the watchdog lock
        for model in shutdown:
            self.shutdown_model(model)
        return len(shutdown)

    def check_idle(self) -> list[str]:
        """``checkIdle``: a scan of every idle backend (the Go loop polls it each interval)."""
        with self._lock:
            now = time.monotonic()
            shutdown = []
            for address, t in list(self.idle_time.items()):
                if now - t > self.idle_timeout:
                    model = self.address_model_map.get(address)
                    if model is not None:
                        shutdown.append(model)
                    self._untrack(address)
        for model in shutdown:
            self.shutdown_model(model)
        return shutdown

    def check_busy(self) -> list[str]:
        """``checkBusy``: a scan of every busy backend."""
        with self._lock:
            now = time.monotonic()
            shutdown = []
            for address, t in list(self.busy_time.items()):
                if now - t > self.timeout:
                    model = self.address_model_map.get(address)
                    if model is not None:
                        shutdown.append(model)
                    self._untrack(address)
        for model in shutdown:
            self.shutdown_model(model)
        return shutdown

    def _untrack(self, address: str) -> None:
        self.busy_time.pop(address, None)
        self.idle_time.pop(address, None)
        self.last_used.pop(address, None)
        self.address_model_map.pop(address, None)
        self.address_map.pop(address, None)


class PortBusy:
    """``async with PortBusy(wd, address):`` Mark on enter, UnMark on exit (also on error)."""

    __slots__ = ("_address", "_wd")

    def __init__(self, wd: WatchDog, address: str) -> None:
        self._wd = wd
        self._address = address

    async def __aenter__(self) -> PortBusy:
        self._wd.mark(self._address)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._wd.unmark(self._address)
