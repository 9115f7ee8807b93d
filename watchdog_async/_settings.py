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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from ._errors import ConfigError

__all__ = ("Settings", "check_count", "parse_duration")

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
        set_ = object.__setattr__
        for name in ("busy_timeout", "idle_timeout", "start_timeout"):
            set_(self, name, parse_duration(getattr(self, name), name=name, optional=True))
        for name in (
            "check_interval",
            "eviction_timeout",
            "stop_timeout",
            "memory_recovery_timeout",
            "probe_timeout",
        ):
            set_(self, name, parse_duration(getattr(self, name), name=name))
        if self.check_interval == 0:
            raise ConfigError("check_interval must be greater than 0")
        set_(self, "max_loaded", check_count(self.max_loaded, "max_loaded"))
        set_(
            self,
            "max_concurrency",
            check_count(self.max_concurrency, "max_concurrency", optional=True, minimum=1),
        )
        set_(self, "max_waiting", check_count(self.max_waiting, "max_waiting"))
        threshold = _fraction(self.memory_threshold, "memory_threshold")
        set_(self, "memory_threshold", threshold)
        target = self.memory_target
        if isinstance(target, str) and target.strip().lower() in _OFF:
            target = None
        if target is not None:
            if threshold is None:
                raise ConfigError("memory_target needs memory_threshold")
            if isinstance(target, int | float) and not isinstance(target, bool) and target == 0:
                target_value = 0.0
            else:
                target_value = _fraction(target, "memory_target") or 0.0
            if target_value >= threshold:
                raise ConfigError(
                    f"memory_target ({target_value}) must be below memory_threshold ({threshold})"
                )
            set_(self, "memory_target", target_value)
        for name in ("force_eviction_when_busy", "stop_on_exit"):
            set_(self, name, _flag(getattr(self, name), name))

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
        unknown = sorted(set(changes) - set(_FIELD_NAMES))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
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
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            variable = prefix + name.upper()
            if variable not in env:
                continue
            raw = env[variable]
            alone: dict[str, Any] = {name: raw}
            try:
                cls(**alone)  # validate this one value alone, to name its variable
            except ConfigError as exc:
                raise ConfigError(f"{variable}={raw!r}: {exc}") from None
            except Exception:  # e.g. memory_target without a threshold: checked together below
                pass
            values[name] = raw
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            named = ", ".join(f"{prefix}{n.upper()}={values[n]!r}" for n in values)
            raise ConfigError(f"{exc} (from {named})") from None


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
