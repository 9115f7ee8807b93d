"""Settings from the environment: ``Settings.from_env`` / ``Supervisor.from_env``, duration
strings, booleans, ``off`` for disabled timeouts, percentages, prefixes, overrides, and every bad
value (each a ConfigError naming the variable and the value). Also ``parse_duration`` on its
own, ``configure()`` with strings, and validation of the settings as a whole."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import anyio
import pytest

from watchdog_async import (
    Backend,
    ConfigError,
    EvictionReason,
    Settings,
    Supervisor,
    WatchdogError,
    parse_duration,
)
from watchdog_async.testing import ManualClock, settle

PREFIX = "WATCHDOG_"
ALL_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))

# One good value per setting, as the environment would give it, and what it must read as.
# memory_target needs memory_threshold too: tested on its own below.
GOOD: dict[str, tuple[str, object]] = {
    "busy_timeout": ("5m", 300.0),
    "idle_timeout": ("15m", 900.0),
    "max_loaded": ("3", 3),
    "memory_threshold": ("90%", 0.9),
    "check_interval": ("500ms", 0.5),
    "force_eviction_when_busy": ("true", True),
    "eviction_timeout": ("1m", 60.0),
    "stop_timeout": ("2.5", 2.5),
    "stop_on_exit": ("false", False),
    "memory_recovery_timeout": ("10s", 10.0),
    "probe_timeout": ("250ms", 0.25),
    "start_timeout": ("1h", 3600.0),
    "max_concurrency": ("4", 4),
    "max_waiting": ("0", 0),
}

DURATIONS: list[tuple[str, float]] = [
    ("500ms", 0.5),
    ("30s", 30.0),
    ("15m", 900.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("1m30s", 90.0),
    ("1h 30m", 5400.0),
    ("1.5h", 5400.0),
    (".5s", 0.5),
    ("1d", 86400.0),
    ("2.5", 2.5),
    ("30", 30.0),
    ("0", 0.0),
    ("0s", 0.0),
    ("  30s  ", 30.0),
    ("15M", 900.0),
]

NOT_DURATIONS = [
    "",
    " ",
    "soon",
    "5x",
    "ms",
    "s5",
    "1m30",
    "5s5",
    "1h-30m",
    "-5",
    "-5s",
    "--5",
    "1y",
    "nan",
    "inf",
    "infinity",
    "1e3s",
    "0x10",
    "5 seconds",
]

TRUE_WORDS = ["true", "TRUE", "True", "1", "yes", "YES", "on", " yes "]
FALSE_WORDS = ["false", "FALSE", "False", "0", "no", "NO", "off", " no "]
OFF_WORDS = ["off", "none", "OFF", "None", "disabled", "never", "null"]

OPTIONAL_TIMEOUTS = ["busy_timeout", "idle_timeout", "start_timeout"]
REQUIRED_DURATIONS = [
    "check_interval",
    "eviction_timeout",
    "stop_timeout",
    "memory_recovery_timeout",
    "probe_timeout",
]

# Every bad value per setting: each must be a ConfigError naming the variable and the value.
BAD: dict[str, list[str]] = {
    "busy_timeout": ["soon", "-1", "5x", "nan", "inf", "1m30", ""],
    "idle_timeout": ["later", "-1s", "1y", ""],
    "max_loaded": ["-1", "1.5", "off", "none", "many", "", "true"],
    "memory_threshold": ["0", "0%", "1.5", "150%", "-0.1", "abc", "nan", "%", ""],
    "check_interval": ["0", "0s", "off", "none", "-5s", "fast", ""],
    "force_eviction_when_busy": ["maybe", "2", "", "y"],
    "eviction_timeout": ["off", "none", "-1", "x", ""],
    "stop_timeout": ["off", "-1", "1y", ""],
    "stop_on_exit": ["sure", "10", "", "-1"],
    "memory_recovery_timeout": ["off", "-1", "abc"],
    "probe_timeout": ["never", "abc", "-0.5"],
    "start_timeout": ["-1", "forever", "5x"],
    "max_concurrency": ["0", "-2", "1.5", "lots", "", "true"],
    "max_waiting": ["-1", "off", "1.5", "many", ""],
}


def make(**values: Any) -> Settings:
    """``Settings(**values)`` with values of any type: strings are read at run time, though
    the fields are typed as what they hold once read."""
    return Settings(**values)


def var(name: str, prefix: str = PREFIX) -> str:
    return prefix + name.upper()


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """os.environ with no WATCHDOG_ variable of the test runner's own."""
    for name in list(os.environ):
        if name.startswith(PREFIX) or name.startswith("MYAPP_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_setting_has_a_good_and_a_bad_case() -> None:
    # a new setting without an environment test fails here
    assert set(GOOD) | {"memory_target"} == ALL_FIELDS
    assert set(BAD) | {"memory_target"} == ALL_FIELDS


# -- each setting from its variable --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_setting_from_its_variable(name: str) -> None:
    raw, expected = GOOD[name]
    settings = Settings.from_env(environ={var(name): raw})
    assert getattr(settings, name) == expected
    # and nothing else moved from its default
    assert settings == make(**{name: expected})


def test_every_setting_at_once() -> None:
    environ = {var(name): raw for name, (raw, _) in GOOD.items()}
    settings = Settings.from_env(environ=environ)
    for name, (_, expected) in GOOD.items():
        assert getattr(settings, name) == expected, name


def test_no_variables_gives_the_defaults() -> None:
    assert Settings.from_env(environ={}) == Settings()


def test_unrelated_variables_are_ignored() -> None:
    environ = {"WATCHDOG": "1", "WATCHDOG_": "x", "WATCHDOG_NOT_A_SETTING": "x", "PATH": "/bin"}
    assert Settings.from_env(environ=environ) == Settings()


def test_memory_target_from_its_variable() -> None:
    settings = Settings.from_env(
        environ={var("memory_threshold"): "0.9", var("memory_target"): "80%"}
    )
    assert settings.memory_threshold == 0.9
    assert settings.memory_target == pytest.approx(0.8)
    assert settings.effective_memory_target == pytest.approx(0.8)


def test_memory_target_at_or_above_the_threshold_names_both_variables() -> None:
    with pytest.raises(ConfigError, match="below") as caught:
        Settings.from_env(environ={var("memory_threshold"): "0.8", var("memory_target"): "0.9"})
    assert var("memory_threshold") in str(caught.value)
    assert var("memory_target") in str(caught.value)


def test_memory_target_without_a_threshold_names_its_variable() -> None:
    with pytest.raises(ConfigError, match="memory_threshold") as caught:
        Settings.from_env(environ={var("memory_target"): "0.8"})
    assert var("memory_target") in str(caught.value)


def test_memory_target_off_without_a_threshold_is_none() -> None:
    assert Settings.from_env(environ={var("memory_target"): "off"}).memory_target is None


@pytest.mark.parametrize("word", ["off", "none", "None"])
def test_memory_target_off_means_the_default_target(word: str) -> None:
    settings = make(memory_threshold=0.9, memory_target=word)
    assert settings.memory_target is None
    assert settings.effective_memory_target == pytest.approx(0.85)


# -- value forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), DURATIONS)
def test_duration_forms_from_the_environment(raw: str, seconds: float) -> None:
    settings = Settings.from_env(environ={var("idle_timeout"): raw, var("eviction_timeout"): raw})
    assert settings.idle_timeout == pytest.approx(seconds)
    assert settings.eviction_timeout == pytest.approx(seconds)
    assert isinstance(settings.idle_timeout, float)


@pytest.mark.parametrize("name", OPTIONAL_TIMEOUTS + REQUIRED_DURATIONS)
@pytest.mark.parametrize(("raw", "seconds"), [("500ms", 0.5), ("15m", 900.0), ("1h30m", 5400.0)])
def test_every_duration_setting_reads_duration_strings(name: str, raw: str, seconds: float) -> None:
    assert getattr(Settings.from_env(environ={var(name): raw}), name) == pytest.approx(seconds)
    assert getattr(make(**{name: raw}), name) == pytest.approx(seconds)


@pytest.mark.parametrize("word", TRUE_WORDS)
@pytest.mark.parametrize("name", ["force_eviction_when_busy", "stop_on_exit"])
def test_true_words(name: str, word: str) -> None:
    assert getattr(Settings.from_env(environ={var(name): word}), name) is True
    assert getattr(make(**{name: word}), name) is True


@pytest.mark.parametrize("word", FALSE_WORDS)
@pytest.mark.parametrize("name", ["force_eviction_when_busy", "stop_on_exit"])
def test_false_words(name: str, word: str) -> None:
    assert getattr(Settings.from_env(environ={var(name): word}), name) is False
    assert getattr(make(**{name: word}), name) is False


@pytest.mark.parametrize("word", OFF_WORDS)
@pytest.mark.parametrize("name", [*OPTIONAL_TIMEOUTS, "max_concurrency", "memory_threshold"])
def test_off_words_turn_an_optional_setting_off(name: str, word: str) -> None:
    on = {"max_concurrency": 2, "memory_threshold": 0.5}.get(name, 10.0)
    # off wins over a default that is on (start_timeout is on by default)
    assert getattr(Settings.from_env(environ={var(name): word}), name) is None
    assert getattr(make(**{name: word}), name) is None
    # and over a value that is on in the code, where the variable is the override's base
    assert getattr(make(**{name: on}).replace(**{name: word}), name) is None


@pytest.mark.parametrize(
    ("raw", "fraction"),
    [("90%", 0.9), ("100%", 1.0), ("0.5", 0.5), ("50 %", 0.5), (" 95% ", 0.95), ("1", 1.0)],
)
def test_memory_threshold_fractions_and_percentages(raw: str, fraction: float) -> None:
    settings = Settings.from_env(environ={var("memory_threshold"): raw})
    assert settings.memory_threshold == pytest.approx(fraction)


@pytest.mark.parametrize(("raw", "number"), [("0", 0), ("7", 7), (" 12 ", 12)])
def test_counts(raw: str, number: int) -> None:
    settings = Settings.from_env(environ={var("max_loaded"): raw, var("max_waiting"): raw})
    assert settings.max_loaded == number
    assert settings.max_waiting == number


# -- every bad value -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw"), [(name, raw) for name, values in BAD.items() for raw in values]
)
def test_every_bad_value_is_a_config_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ={var(name): raw})
    message = str(caught.value)
    assert var(name) in message
    assert repr(raw) in message
    assert isinstance(caught.value, WatchdogError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("raw", NOT_DURATIONS)
def test_every_malformed_duration_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ={var("stop_timeout"): raw})
    assert var("stop_timeout") in str(caught.value)


@pytest.mark.parametrize("raw", ["abc", "2", "150%"])
def test_bad_memory_target_names_its_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ={var("memory_threshold"): "0.9", var("memory_target"): raw})
    assert var("memory_target") in str(caught.value)


def test_one_bad_variable_among_good_ones_is_named() -> None:
    environ = {var(name): raw for name, (raw, _) in GOOD.items()}
    environ[var("probe_timeout")] = "quick"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ=environ)
    assert var("probe_timeout") in str(caught.value)
    assert "'quick'" in str(caught.value)


# -- prefix, overrides, environ ------------------------------------------------------------


def test_prefix() -> None:
    environ = {"MYAPP_IDLE_TIMEOUT": "1m", var("idle_timeout"): "2m"}
    assert Settings.from_env("MYAPP_", environ=environ).idle_timeout == 60.0
    assert Settings.from_env(prefix="MYAPP_", environ=environ).idle_timeout == 60.0
    assert Settings.from_env(environ=environ).idle_timeout == 120.0
    assert Settings.from_env("OTHER_", environ=environ) == Settings()


def test_empty_prefix_reads_bare_names() -> None:
    assert Settings.from_env("", environ={"IDLE_TIMEOUT": "30s"}).idle_timeout == 30.0


def test_variable_names_are_case_sensitive() -> None:
    assert Settings.from_env(environ={"watchdog_idle_timeout": "30s"}).idle_timeout is None


def test_bad_value_under_a_prefix_names_the_prefixed_variable() -> None:
    with pytest.raises(ConfigError, match="MYAPP_BUSY_TIMEOUT"):
        Settings.from_env("MYAPP_", environ={"MYAPP_BUSY_TIMEOUT": "whenever"})


def test_overrides_win_over_the_environment() -> None:
    environ = {var("idle_timeout"): "1m", var("max_loaded"): "4"}
    settings = Settings.from_env(environ=environ, idle_timeout=5)
    assert settings.idle_timeout == 5.0
    assert settings.max_loaded == 4
    assert Settings.from_env(environ=environ, idle_timeout="2m").idle_timeout == 120.0
    assert Settings.from_env(environ=environ, idle_timeout=None).idle_timeout is None
    assert Settings.from_env(environ={}, max_concurrency=3).max_concurrency == 3


def test_a_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="idle_timeout"):
        Settings.from_env(environ={}, idle_timeout="bogus")
    with pytest.raises(ConfigError, match="max_loaded"):
        Settings.from_env(environ={}, max_loaded=-1)


def test_an_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="idle_timout"):
        Settings.from_env(environ={}, idle_timout=5)


def test_overrides_are_validated_with_the_environment() -> None:
    # the threshold comes from the environment, the target from the code: checked together
    with pytest.raises(ConfigError, match="below"):
        Settings.from_env(environ={var("memory_threshold"): "0.8"}, memory_target=0.9)
    settings = Settings.from_env(environ={var("memory_threshold"): "0.8"}, memory_target=0.7)
    assert settings.memory_target == pytest.approx(0.7)


def test_environ_mapping_replaces_os_environ(clean_environ: pytest.MonkeyPatch) -> None:
    clean_environ.setenv(var("idle_timeout"), "1m")
    assert Settings.from_env(environ={}).idle_timeout is None
    assert Settings.from_env(environ={var("idle_timeout"): "2m"}).idle_timeout == 120.0
    assert Settings.from_env().idle_timeout == 60.0  # environ=None: os.environ


def test_os_environ_by_default(clean_environ: pytest.MonkeyPatch) -> None:
    for name, (raw, _) in GOOD.items():
        clean_environ.setenv(var(name), raw)
    settings = Settings.from_env()
    for name, (_, expected) in GOOD.items():
        assert getattr(settings, name) == expected, name
    clean_environ.setenv(var("max_waiting"), "lots")
    with pytest.raises(ConfigError, match=var("max_waiting")):
        Settings.from_env()


def test_from_env_returns_the_class_it_is_called_on() -> None:
    class Mine(Settings):
        pass

    assert type(Mine.from_env(environ={})) is Mine


# -- parse_duration ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), DURATIONS)
def test_parse_duration_strings(raw: str, seconds: float) -> None:
    result = parse_duration(raw)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize(("value", "seconds"), [(0, 0.0), (5, 5.0), (2.5, 2.5), (1e-3, 0.001)])
def test_parse_duration_numbers(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize("raw", NOT_DURATIONS)
def test_parse_duration_refuses_malformed_strings(raw: str) -> None:
    with pytest.raises(ConfigError, match="my_timeout"):
        parse_duration(raw, name="my_timeout")


@pytest.mark.parametrize(
    "value", [-1, -0.001, math.nan, math.inf, -math.inf, True, False, [5], {"s": 5}, b"5s"]
)
def test_parse_duration_refuses_other_values(value: object) -> None:
    with pytest.raises(ConfigError, match="my_timeout"):
        parse_duration(value, name="my_timeout")


@pytest.mark.parametrize("word", [None, *OFF_WORDS])
def test_parse_duration_off(word: str | None) -> None:
    assert parse_duration(word, optional=True) is None
    with pytest.raises(ConfigError, match="cannot be turned off"):
        parse_duration(word, name="stop_timeout")


def test_parse_duration_default_name() -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("x")


# -- Settings as a whole -------------------------------------------------------------------


def test_settings_accept_strings_directly() -> None:
    settings = make(
        idle_timeout="15m",
        busy_timeout="off",
        check_interval="500ms",
        memory_threshold="90%",
        memory_target="85%",
        stop_on_exit="no",
        max_concurrency="2",
    )
    assert settings.idle_timeout == 900.0
    assert settings.busy_timeout is None
    assert settings.check_interval == 0.5
    assert settings.memory_threshold == pytest.approx(0.9)
    assert settings.memory_target == pytest.approx(0.85)
    assert settings.stop_on_exit is False
    assert settings.max_concurrency == 2


@pytest.mark.parametrize("target", [0.9, 0.95, 1.0, "90%"])
def test_memory_target_at_or_above_the_threshold_is_refused(target: object) -> None:
    with pytest.raises(ConfigError, match="below"):
        make(memory_threshold=0.9, memory_target=target)


def test_memory_target_without_threshold_is_refused() -> None:
    with pytest.raises(ConfigError, match="memory_threshold"):
        Settings(memory_target=0.5)


def test_memory_target_below_the_threshold() -> None:
    assert Settings(memory_threshold=0.9, memory_target=0.8).effective_memory_target == 0.8
    assert Settings(memory_threshold=0.9, memory_target=0).effective_memory_target == 0.0
    assert Settings(memory_threshold=0.9).effective_memory_target == pytest.approx(0.85)
    assert Settings(memory_threshold=0.03).effective_memory_target == 0.0
    assert Settings().effective_memory_target is None


def test_replace_validates_the_whole() -> None:
    base = Settings(memory_threshold=0.9, memory_target=0.8)
    with pytest.raises(ConfigError, match="below"):
        base.replace(memory_threshold=0.7)  # the target is now above it
    with pytest.raises(ConfigError, match="unknown setting"):
        base.replace(idle_timout=5)
    assert base.replace(idle_timeout="1m").idle_timeout == 60.0


# -- configure() and Supervisor.from_env ---------------------------------------------------


async def test_configure_accepts_strings() -> None:
    clock = ManualClock(1000.0)
    async with Supervisor(clock=clock) as sup:
        settings = sup.configure(
            idle_timeout="15m",
            busy_timeout="1h30m",
            check_interval="500ms",
            start_timeout="off",
            memory_threshold="90%",
            force_eviction_when_busy="yes",
            max_concurrency="4",
            max_waiting="10",
        )
        assert settings is sup.settings
        assert settings.idle_timeout == 900.0
        assert settings.busy_timeout == 5400.0
        assert settings.check_interval == 0.5
        assert settings.start_timeout is None
        assert settings.memory_threshold == pytest.approx(0.9)
        assert settings.force_eviction_when_busy is True
        assert settings.max_concurrency == 4
        assert settings.max_waiting == 10
        assert sup.configure(idle_timeout="none", max_concurrency="off").idle_timeout is None
        assert sup.settings.max_concurrency is None


async def test_configure_with_a_bad_string_changes_nothing() -> None:
    async with Supervisor(clock=ManualClock(), idle_timeout="1m") as sup:
        before = sup.settings
        with pytest.raises(ConfigError, match="busy_timeout"):
            sup.configure(idle_timeout="2m", busy_timeout="whenever")
        assert sup.settings is before


async def test_a_duration_string_drives_the_idle_timer() -> None:
    clock = ManualClock(1000.0)
    async with Supervisor(clock=clock) as sup:
        sup.configure(idle_timeout="1m30s")
        sup.register("127.0.0.1:9001", "m")
        clock.advance(89)
        await settle(sup)
        assert sup.loaded_count == 1
        clock.advance(2)
        await settle(sup)
        assert sup.loaded_count == 0


async def test_register_accepts_a_duration_string() -> None:
    async with Supervisor(clock=ManualClock()) as sup:
        backend = sup.register("127.0.0.1:9001", "m", idle_timeout="2m")
        assert backend.idle_timeout == 120.0
        with pytest.raises(ConfigError, match="idle_timeout"):
            sup.register("127.0.0.1:9002", "m", idle_timeout="2 weeks")


async def test_supervisor_from_env(clean_environ: pytest.MonkeyPatch) -> None:
    clean_environ.setenv(var("idle_timeout"), "1m")
    clean_environ.setenv(var("max_concurrency"), "2")
    clean_environ.setenv(var("stop_on_exit"), "false")
    clock = ManualClock(1000.0)
    stopped: list[str] = []

    async def shutdown(backend: Backend) -> None:
        stopped.append(backend.address)

    # keyword settings override the environment; other keywords pass through
    async with Supervisor.from_env(clock=clock, shutdown=shutdown, idle_timeout="30s") as sup:
        assert sup.settings.idle_timeout == 30.0
        assert sup.settings.max_concurrency == 2
        assert sup.settings.stop_on_exit is False
        sup.register("127.0.0.1:9001", "m")
        events = sup.events()
        clock.advance(31)  # the ManualClock passed through drives the idle timer
        await settle(sup)
        assert stopped == ["127.0.0.1:9001"]
        with anyio.fail_after(5):
            eviction = await events.__anext__()
        assert eviction.reason is EvictionReason.IDLE_TIMEOUT


async def test_supervisor_from_env_with_a_prefix(clean_environ: pytest.MonkeyPatch) -> None:
    clean_environ.setenv("MYAPP_MAX_LOADED", "2")
    clean_environ.setenv(var("max_loaded"), "7")
    async with Supervisor.from_env("MYAPP_", clock=ManualClock()) as sup:
        assert sup.settings.max_loaded == 2
    async with Supervisor.from_env(prefix="MYAPP_", clock=ManualClock()) as sup:
        assert sup.settings.max_loaded == 2
    async with Supervisor.from_env(clock=ManualClock()) as sup:
        assert sup.settings.max_loaded == 7


def test_supervisor_from_env_bad_value_names_the_variable(
    clean_environ: pytest.MonkeyPatch,
) -> None:
    clean_environ.setenv(var("check_interval"), "0")
    with pytest.raises(ConfigError, match=var("check_interval")):
        Supervisor.from_env()
    clean_environ.setenv("MYAPP_STOP_TIMEOUT", "off")
    with pytest.raises(ConfigError, match="MYAPP_STOP_TIMEOUT"):
        Supervisor.from_env("MYAPP_")


def test_supervisor_from_env_bad_keyword_setting(clean_environ: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="max_waiting"):
        Supervisor.from_env(max_waiting=-1)


def test_supervisor_from_env_typo_is_named(clean_environ: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="idle_timout"):
        Supervisor.from_env(idle_timout=5)


def test_from_env_settings_equal_constructed_ones() -> None:
    environ = {var(name): raw for name, (raw, _) in GOOD.items()}
    expected = make(**{name: value for name, (_, value) in GOOD.items()})
    assert Settings.from_env(environ=environ) == expected
