"""Settings: one frozen, validated record of every tunable value.

Durations are seconds (int or float) or strings such as ``"500ms"``, ``"30s"``, ``"15m"``,
``"1h"`` or ``"1h30m"``; ``None`` (or ``"off"`` / ``"none"`` from strings) turns a timeout off
where that is allowed. Constructing a ``Settings`` validates every field at once and raises
:class:`ConfigError` naming the field and the bad value, so a bad change changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from ._errors import ConfigError

__all__ = ("Settings", "check_count", "parse_duration", "required_duration")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_OFF = frozenset({"off", "none", "null", "disabled", "never"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_duration(
    value: object, *, name: str = "duration", optional: bool = False
) -> float | None:
    """Seconds from a number or a duration string; ``None`` only where ``optional``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be turned off (got {value!r})")
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a duration, not a bool ({value!r})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_string(value, name)
    else:
        raise ConfigError(f"{name} must be seconds or a duration string, got {value!r}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ConfigError(f"{name} must be a finite, non-negative duration, got {value!r}")
    return seconds


def _parse_duration_string(text: str, name: str) -> float:
    compact = text.strip().lower().replace(" ", "")
    try:
        return float(compact)  # plain seconds: "2.5"
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(compact):
        raise ConfigError(
            f"{name}: cannot read {text!r} as a duration (use seconds or e.g. 500ms, 30s, 15m, 1h)"
        )
    return total


def check_count(
    value: object, name: str, *, optional: bool = False, minimum: int = 0
) -> int | None:
    """A whole number >= ``minimum`` (from an int or its string); ``None``/"off" only where
    ``optional``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if optional and text in _OFF:
            return None
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def _fraction(value: object, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")
    fraction = float(value)
    if not (0.0 < fraction <= 1.0):  # also refuses NaN
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return fraction


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every tunable value of a :class:`Supervisor`; see README for each one's meaning."""

    busy_timeout: float | None = None
    idle_timeout: float | None = None
    max_loaded: int = 0
    memory_threshold: float | None = None
    memory_target: float | None = None
    check_interval: float = 1.0
    force_eviction_when_busy: bool = False
    eviction_timeout: float = 30.0
    stop_timeout: float = 10.0
    stop_on_exit: bool = True
    memory_recovery_timeout: float = 5.0
    probe_timeout: float = 5.0
    start_timeout: float | None = 300.0
    max_concurrency: int | None = None
    max_waiting: int = 512

    def __post_init__(self) -> None:
        for name, normalise in _NORMALISERS.items():
            object.__setattr__(self, name, normalise(getattr(self, name), name))
        # the rules that join two fields
        threshold, target = self.memory_threshold, self.memory_target
        if target is not None:
            if threshold is None:
                raise ConfigError("memory_target needs memory_threshold")
            if target >= threshold:
                raise ConfigError(
                    f"memory_target ({target}) must be below memory_threshold ({threshold})"
                )

    @property
    def effective_memory_target(self) -> float | None:
        """The fraction the memory reclaimer evicts down to (default: threshold - 0.05)."""
        if self.memory_threshold is None:
            return None
        if self.memory_target is not None:
            return self.memory_target
        return max(0.0, self.memory_threshold - 0.05)

    def replace(self, **changes: Any) -> Self:
        """A new Settings with ``changes`` applied, validated as a whole."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        prefix: str = "WATCHDOG_",
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Self:
        """Settings from environment variables ``PREFIX + NAME.upper()`` (e.g.
        ``WATCHDOG_IDLE_TIMEOUT=15m``); ``overrides`` win over the environment. A bad value
        raises :class:`ConfigError` naming the variable."""
        _refuse_unknown(overrides)
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        for name, normalise in _NORMALISERS.items():
            variable = prefix + name.upper()
            if variable in env:
                raw = env[variable]
                try:
                    values[name] = normalise(raw, name)
                except ConfigError as exc:
                    raise ConfigError(f"{variable}={raw!r}: {exc}") from None
                source[name] = f"{variable}={raw!r}"
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            named = ", ".join(source[n] for n in values if n in source and n not in overrides)
            raise ConfigError(f"{exc} (from {named})" if named else str(exc)) from None


def _refuse_unknown(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(_NORMALISERS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")


def required_duration(value: object, name: str) -> float:
    """Seconds from a duration that cannot be turned off."""
    seconds = parse_duration(value, name=name)
    assert seconds is not None
    return seconds


def _optional_duration(value: object, name: str) -> float | None:
    return parse_duration(value, name=name, optional=True)


def _interval(value: object, name: str) -> float:
    seconds = required_duration(value, name)
    if seconds == 0:
        raise ConfigError(f"{name} must be greater than 0")
    return seconds


def _target(value: object, name: str) -> float | None:
    if isinstance(value, str) and value.strip() in ("0", "0.0", "0%"):
        value = 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0  # evict down to nothing: allowed, unlike a threshold of 0
    return _fraction(value, name)


# How each field is read and checked, alone (the rules joining fields are in __post_init__).
_NORMALISERS: dict[str, Callable[[object, str], Any]] = {
    "busy_timeout": _optional_duration,
    "idle_timeout": _optional_duration,
    "max_loaded": check_count,
    "memory_threshold": _fraction,
    "memory_target": _target,
    "check_interval": _interval,
    "force_eviction_when_busy": _flag,
    "eviction_timeout": required_duration,
    "stop_timeout": required_duration,
    "stop_on_exit": _flag,
    "memory_recovery_timeout": required_duration,
    "probe_timeout": required_duration,
    "start_timeout": _optional_duration,
    "max_concurrency": lambda value, name: check_count(value, name, optional=True, minimum=1),
    "max_waiting": check_count,
}

assert set(_NORMALISERS) == {f.name for f in dataclasses.fields(Settings)}
