"""How the supervisor's errors map to HTTP answers: one rule for every web integration."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._errors import (
    BackendBusyError,
    BackendStoppedError,
    CapacityError,
    SupervisorClosedError,
    UnknownBackendError,
)

__all__ = ("HttpError", "http_error")


class HttpError(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def http_error(exc: BaseException, *, retry_after: int = 1) -> HttpError | None:
    """The HTTP answer to one of the supervisor's errors, or None for any other exception.

    - :class:`BackendBusyError` (wait queue full, or ``wait_timeout`` ran out),
      :class:`CapacityError` (no room in time) and :class:`BackendStoppedError` (the backend was
      stopped under the call or just before; a retry loads it again): 503 + ``Retry-After``.
    - :class:`SupervisorClosedError` (shutting down): 503 without ``Retry-After``.
    - :class:`UnknownBackendError`: 404.
    """
    headers: dict[str, str] = {}
    if isinstance(exc, UnknownBackendError):
        status = 404
    elif isinstance(exc, SupervisorClosedError):
        status = 503
    elif isinstance(exc, BackendBusyError | CapacityError | BackendStoppedError):
        status, headers = 503, {"Retry-After": str(max(0, int(retry_after)))}
    else:
        return None
    body: dict[str, Any] = {"detail": str(exc), "error": type(exc).__name__}
    if isinstance(exc, BackendStoppedError):
        body["reason"] = exc.reason.value
    return HttpError(status, body, headers)
