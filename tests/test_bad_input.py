"""Bad input, table-driven, at every public entry point: wrong types and values (strings for
numbers, NaN, infinities, negative counts, bools where numbers go, empty addresses), unknown or
duplicate backends, and calls on a supervisor that is not running. Each gets its documented
typed error (see ``watchdog_async._errors``) and changes nothing: the settings object, the
snapshot (addresses, LRU order, in-flight counts, idle times under a still clock), the fault
counts and the shutdown calls are compared before and after.

Settings accept strings where the environment gives them (``"3"``, ``"500ms"``, ``"90%"``):
numeric strings are valid settings by design; only non-numeric ones are bad. Entry points that
take counts or bytes directly (``size``, ``pending``, ``memory``, ``buffer``...) refuse strings.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import pytest

from watchdog_async import (
    Backend,
    BackendStatus,
    ConfigError,
    DuplicateBackendError,
    Settings,
    Supervisor,
    SupervisorClosedError,
    UnknownBackendError,
)
from watchdog_async.testing import ManualClock

Call = Callable[[Supervisor], Any]  # returns None or an awaitable


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, backend: Backend) -> None:
        self.calls.append(backend.address)


async def start(model: str) -> tuple[str, None]:
    return f"started-{model}", None


async def enter(sup: Supervisor, *args: Any, **kwargs: Any) -> None:
    async with sup.busy(*args, **kwargs):
        pass


async def enter_sync(sup: Supervisor, address: Any) -> None:
    def in_thread() -> None:
        with sup.busy_sync(address):
            pass

    await anyio.to_thread.run_sync(in_thread)


async def acquire(sup: Supervisor, model: Any, start_: Any = start, **kwargs: Any) -> None:
    async with sup.acquire(model, start_, **kwargs):
        pass


async def invoke(call: Call, sup: Supervisor) -> None:
    result = call(sup)
    if inspect.isawaitable(result):
        await result


def free_pid() -> int:
    """A pid no process has right now (a child that exited and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def exited_popen() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc


@dataclass
class Running:
    sup: Supervisor
    recorder: Recorder

    def state(self) -> tuple[Settings, list[BackendStatus], dict[str, int], list[str], int]:
        sup = self.sup
        return sup.settings, sup.snapshot(), sup.faults, list(self.recorder.calls), sup.loaded_count


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    """A running supervisor with three backends: 'a' idle, 'b' pinned, 'c' with a call in
    flight; its clock stands still, so the snapshot only changes if something changes."""
    recorder = Recorder()
    clock = ManualClock(1000.0)
    async with Supervisor(shutdown=recorder, clock=clock, max_loaded=5) as sup:
        sup.register("a", "model-a")
        clock.advance(1)
        sup.register("b", "model-b", pinned=True)
        clock.advance(1)
        sup.register("c", "model-c")
        entered, release = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:

            async def hold() -> None:
                async with sup.busy("c"):
                    entered.set()
                    await release.wait()

            tg.start_soon(hold)
            await entered.wait()
            yield Running(sup, recorder)
            release.set()


# -- settings --------------------------------------------------------------------------------

BAD_DURATIONS: tuple[Any, ...] = (
    "abc",
    "",
    "-5s",
    "5x",
    math.nan,
    math.inf,
    -math.inf,
    -1,
    True,
    [1],
    b"5",
)
BAD_REQUIRED: tuple[Any, ...] = ("abc", math.nan, math.inf, -0.5, False, None, "off", {})
BAD_SETTINGS: list[tuple[str, Any]] = [
    *[
        (name, value)
        for name in ("busy_timeout", "idle_timeout", "start_timeout")
        for value in BAD_DURATIONS
    ],
    *[
        (name, value)
        for name in (
            "check_interval",
            "eviction_timeout",
            "stop_timeout",
            "memory_recovery_timeout",
            "probe_timeout",
        )
        for value in BAD_REQUIRED
    ],
    ("check_interval", 0),
    ("check_interval", "0s"),
    *[("max_loaded", v) for v in (-1, 1.5, True, "three", "2.5", math.nan, math.inf, None)],
    *[("max_waiting", v) for v in (-1, 1.0, False, "many", None)],
    *[("max_concurrency", v) for v in (0, -1, 2.5, True, "lots", math.inf)],
    *[
        ("memory_threshold", v)
        for v in (0, 0.0, -0.1, 1.01, 1.5, "150%", "0%", math.nan, math.inf, True, "high", [0.9])
    ],
    *[("force_eviction_when_busy", v) for v in ("maybe", 1, 0, None, 1.0)],
    *[("stop_on_exit", v) for v in ("maybe", 2, None)],
]

BAD_COMBINATIONS: list[dict[str, Any]] = [
    {"memory_target": 0.5},  # needs a threshold
    {"memory_threshold": 0.8, "memory_target": 0.8},
    {"memory_threshold": 0.8, "memory_target": 0.9},
    {"memory_threshold": 0.8, "memory_target": -0.1},
    {"memory_threshold": 0.8, "memory_target": math.nan},
    {"memory_threshold": 0.8, "memory_target": True},
    {"max_loaded": 3, "busy_timeout": "forever"},  # one bad value spoils the whole change
]


def settings_cases() -> list[Any]:
    cases = [pytest.param({name: value}, id=f"{name}={value!r}") for name, value in BAD_SETTINGS]
    cases += [pytest.param(changes, id=repr(changes)) for changes in BAD_COMBINATIONS]
    return cases


@pytest.mark.parametrize("changes", settings_cases())
async def test_bad_settings_are_refused_everywhere_and_change_nothing(
    running: Running, changes: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError):
        Settings(**changes)
    with pytest.raises(ConfigError):
        Supervisor(**changes)
    with pytest.raises(ConfigError):
        Settings().replace(**changes)
    before = running.state()
    with pytest.raises(ConfigError):
        running.sup.configure(**changes)
    assert running.state() == before
    assert running.sup.settings is before[0]


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_MAX_LOADED": "three"},
        {"WATCHDOG_MAX_LOADED": "-1"},
        {"WATCHDOG_IDLE_TIMEOUT": "15 minutes"},
        {"WATCHDOG_BUSY_TIMEOUT": "nan"},
        {"WATCHDOG_STOP_TIMEOUT": "inf"},
        {"WATCHDOG_CHECK_INTERVAL": "0"},
        {"WATCHDOG_MEMORY_THRESHOLD": "150%"},
        {"WATCHDOG_MEMORY_TARGET": "0.5"},
        {"WATCHDOG_STOP_ON_EXIT": "perhaps"},
        {"WATCHDOG_MAX_CONCURRENCY": "0"},
        {"WATCHDOG_MAX_WAITING": "1.5"},
    ],
    ids=lambda environ: ",".join(f"{k}={v}" for k, v in environ.items()),
)
def test_bad_environment_is_refused_naming_the_variable(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ=environ)
    assert next(iter(environ)) in str(caught.value)


def test_unknown_override_to_from_env_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(environ={}, idle_timout=5)


# -- supervisor construction -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"shutdown": "stop it"}, id="shutdown not callable"),
        pytest.param({"shutdown": 3}, id="shutdown a number"),
        pytest.param({"clock": 1000.0}, id="clock a number"),
        pytest.param({"memory_probe": object()}, id="probe without read()"),
        pytest.param({"memory_probe": "nvml"}, id="probe a string"),
        pytest.param({"settings": Settings(), "max_loaded": 2}, id="settings and values"),
        pytest.param({"no_such_setting": 1}, id="unknown setting"),
        pytest.param({"idle_timout": "15m"}, id="misspelt setting"),
        pytest.param(
            {"settings": {"max_loaded": 2}},
            id="settings not a Settings",
        ),
    ],
)
def test_bad_construction_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Supervisor(**kwargs)


# -- every entry point on a running supervisor -------------------------------------------------


def entry_point_cases() -> list[Any]:
    bad_numbers = (-1, 1.5, True, "1", math.nan, None)
    cases: list[tuple[str, Call, type[BaseException], Any]] = [
        # register: each argument
        *[
            (f"register address={v!r}", lambda s, v=v: s.register(v, "m"), ConfigError, ())
            for v in ("", 3, None, b"addr")
        ],
        *[
            (f"register model={v!r}", lambda s, v=v: s.register("new", v), ConfigError, ())
            for v in ("", 3, None)
        ],
        *[
            (
                f"register process={label}",
                lambda s, v=v: s.register("new", "m", process=v),
                ConfigError,
                (),
            )
            for label, v in (
                ("'123'", "123"),
                ("-1", -1),
                ("0", 0),
                ("True", True),
                ("1.5", 1.5),
                ("own pid", os.getpid()),
                ("an object", object()),
            )
        ],
        (
            "register process=a free pid",
            lambda s: s.register("new", "m", process=free_pid()),
            ConfigError,
            (),
        ),
        (
            "register process=exited Popen",
            lambda s: s.register("new", "m", process=exited_popen()),
            ConfigError,
            (),
        ),
        *[
            (
                f"register pinned={v!r}",
                lambda s, v=v: s.register("new", "m", pinned=v),
                ConfigError,
                (),
            )
            for v in ("yes", 1, None)
        ],
        *[
            (
                f"register idle_timeout={v!r}",
                lambda s, v=v: s.register("new", "m", idle_timeout=v),
                ConfigError,
                (),
            )
            for v in (-1, math.nan, math.inf, "soon", True)
        ],
        *[
            (f"register size={v!r}", lambda s, v=v: s.register("new", "m", size=v), ConfigError, ())
            for v in (-1, 1.5, True, "1GB", math.nan, math.inf)
        ],
        *[
            (
                f"register size={v!r}",
                lambda s, v=v: s.register("new", "m", size=v),
                ConfigError,
                (),
            )
            for v in ("1024",)
        ],
        *[
            (
                f"register max_concurrency={v!r}",
                lambda s, v=v: s.register("new", "m", max_concurrency=v),
                ConfigError,
                (),
            )
            for v in (0, -1, 1.5, True, "many")
        ],
        *[
            (
                f"register max_concurrency={v!r}",
                lambda s, v=v: s.register("new", "m", max_concurrency=v),
                ConfigError,
                (),
            )
            for v in ("2",)
        ],
        ("register duplicate", lambda s: s.register("a", "other"), DuplicateBackendError, ()),
        # busy / busy_sync
        ("busy unknown", lambda s: enter(s, "nope"), UnknownBackendError, ()),
        ("busy ''", lambda s: enter(s, ""), ConfigError, ()),
        ("busy 3", lambda s: enter(s, 3), ConfigError, ()),
        *[
            (
                f"busy wait_timeout={v!r}",
                lambda s, v=v: enter(s, "a", wait_timeout=v),
                ConfigError,
                (),
            )
            for v in ("soon", math.nan, -1, True, math.inf)
        ],
        ("busy_sync unknown", lambda s: enter_sync(s, "nope"), UnknownBackendError, ()),
        ("busy_sync ''", lambda s: enter_sync(s, ""), ConfigError, ()),
        # touch / forget / evict
        *[
            (f"{name} unknown", lambda s, f=f: f(s, "nope"), UnknownBackendError, ())
            for name, f in (
                ("touch", Supervisor.touch),
                ("forget", Supervisor.forget),
                ("evict", Supervisor.evict),
            )
        ],
        *[
            (f"{name} {v!r}", lambda s, f=f, v=v: f(s, v), ConfigError, ())
            for name, f in (
                ("touch", Supervisor.touch),
                ("forget", Supervisor.forget),
                ("evict", Supervisor.evict),
            )
            for v in ("", 3, None)
        ],
        *[
            (f"evict force={v!r}", lambda s, v=v: s.evict("a", force=v), ConfigError, ())
            for v in ("yes", 1, None)
        ],
        # make_room
        *[
            (f"make_room pending={v!r}", lambda s, v=v: s.make_room(pending=v), ConfigError, ())
            for v in bad_numbers
            if v is not None
        ],
        *[
            (f"make_room memory={v!r}", lambda s, v=v: s.make_room(memory=v), ConfigError, ())
            for v in (-1, 1.5, True, "1GB", math.nan)
        ],
        *[
            (f"make_room timeout={v!r}", lambda s, v=v: s.make_room(timeout=v), ConfigError, ())
            for v in ("soon", -1, math.nan, math.inf, True)
        ],
        *[
            (f"make_room force={v!r}", lambda s, v=v: s.make_room(force=v), ConfigError, ())
            for v in ("yes", 1)
        ],
        # acquire
        *[
            (f"acquire model={v!r}", lambda s, v=v: acquire(s, v), ConfigError, ())
            for v in ("", 3, None)
        ],
        *[
            (f"acquire start={v!r}", lambda s, v=v: acquire(s, "model-a", v), ConfigError, ())
            for v in ("start", None)
        ],
        *[
            (
                f"acquire new model memory={v!r}",
                lambda s, v=v: acquire(s, "new", memory=v),
                ConfigError,
                (),
            )
            for v in (-1, 1.5, True, "1GB")
        ],
        *[
            (
                f"acquire loaded model memory={v!r}",
                lambda s, v=v: acquire(s, "model-a", memory=v),
                ConfigError,
                (),
            )
            for v in (-1, 1.5, True, "1GB")
        ],
        # events
        *[
            (f"events buffer={v!r}", lambda s, v=v: s.events(buffer=v), ConfigError, ())
            for v in (0, -1, 1.5, True, "10", None, math.inf)
        ],
    ]
    return [pytest.param(call, error, id=label, marks=marks) for label, call, error, marks in cases]


@pytest.mark.parametrize(("call", "error"), entry_point_cases())
async def test_bad_call_gets_its_typed_error_and_changes_nothing(
    running: Running, call: Call, error: type[BaseException]
) -> None:
    before = running.state()
    with pytest.raises(error):
        await invoke(call, running.sup)
    assert running.state() == before


async def test_busy_sync_on_the_event_loop_thread_is_refused(running: Running) -> None:
    before = running.state()
    with pytest.raises(RuntimeError), running.sup.busy_sync("a"):
        pass
    assert running.state() == before


# -- a supervisor that is not running ----------------------------------------------------------


def every_call() -> list[Any]:
    calls: list[tuple[str, Call]] = [
        ("register", lambda s: s.register("z", "m")),
        ("busy", lambda s: enter(s, "a")),
        ("busy_sync", lambda s: enter_sync(s, "a")),
        ("touch", lambda s: s.touch("a")),
        ("forget", lambda s: s.forget("a")),
        ("evict", lambda s: s.evict("a")),
        ("evict force", lambda s: s.evict("a", force=True)),
        ("make_room", lambda s: s.make_room()),
        ("check", lambda s: s.check()),
        ("acquire", lambda s: acquire(s, "model-a")),
        ("events", lambda s: s.events()),
        ("configure", lambda s: s.configure(max_loaded=1)),
        ("run again", lambda s: s.run()),
    ]
    return [pytest.param(call, id=label) for label, call in calls]


@pytest.fixture
async def closed() -> tuple[Supervisor, Recorder]:
    recorder = Recorder()
    sup = Supervisor(shutdown=recorder, clock=ManualClock(), stop_on_exit=False)
    async with sup:
        sup.register("a", "model-a")
    return sup, recorder


@pytest.mark.parametrize("call", every_call())
async def test_calls_after_close_are_refused(
    closed: tuple[Supervisor, Recorder], call: Call
) -> None:
    sup, recorder = closed
    before = (sup.settings, sup.faults)
    with pytest.raises(SupervisorClosedError):
        await invoke(call, sup)
    assert (sup.settings, sup.faults, recorder.calls) == (*before, [])


NOT_BEFORE_START = {"configure", "events", "run again"}  # allowed (or starting) before a start


@pytest.mark.parametrize("call", [p for p in every_call() if p.id not in NOT_BEFORE_START])
async def test_calls_before_start_are_refused(call: Call) -> None:
    sup = Supervisor(clock=ManualClock())
    before = sup.settings
    with pytest.raises(SupervisorClosedError):
        await invoke(call, sup)
    assert sup.settings is before
