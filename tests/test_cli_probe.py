"""`python -m watchdog_async probe`: real subprocesses on this machine, and scripted in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import watchdog_async.__main__ as cli
from watchdog_async import _memory
from watchdog_async._memory import DeviceMemory, MemoryReading

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "watchdog_async", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_subprocess_prints_devices() -> None:
    done = run_cli("probe")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("probe: ")
    assert any(line.startswith("device 0: ") and "GiB used" in line for line in lines)
    if lines[0].startswith("probe: system RAM"):
        assert "device 0: system RAM (ram): " in done.stdout


def test_probe_subprocess_json() -> None:
    done = run_cli("probe", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["problem"] is None
    devices = data["devices"]
    assert devices
    for device in devices:
        assert set(device) == {"index", "name", "kind", "total", "used", "fraction", "processes"}
        assert 0 <= device["used"] <= device["total"]
        assert device["fraction"] == pytest.approx(device["used"] / device["total"])
    if data["probe"].startswith("system RAM"):  # this machine: no GPU
        assert "NVML not available" in data["probe"]
        (ram,) = devices
        assert (ram["index"], ram["name"], ram["kind"], ram["processes"]) == (
            0,
            "system RAM",
            "ram",
            None,
        )
    else:
        assert data["probe"].startswith("NVML: ")
        assert {device["kind"] for device in devices} <= {"gpu", "unified"}


def test_no_command_is_a_usage_error() -> None:
    done = run_cli()
    assert done.returncode == 2
    assert "usage:" in done.stderr


class ScriptedProbe:
    """Two GPUs with known per-process figures."""

    description = "NVML: 2 GPU(s)"

    def __init__(self, reading: MemoryReading | Exception) -> None:
        self.reading = reading
        self.closed = False

    def read(self) -> MemoryReading:
        if isinstance(self.reading, Exception):
            raise self.reading
        return self.reading

    def close(self) -> None:
        self.closed = True


TWO_GPUS = MemoryReading(
    (
        DeviceMemory(0, "NVIDIA H100", 80 * GIB, 60 * GIB, "gpu", {1234: 40 * GIB, 99: 512 * MIB}),
        DeviceMemory(1, "NVIDIA GB10", 128 * GIB, 32 * GIB, "unified", None),
    )
)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedProbe:
    probe = ScriptedProbe(TWO_GPUS)
    monkeypatch.setattr(_memory, "default_probe", lambda: probe)
    return probe


def test_probe_json_in_process(scripted: ScriptedProbe, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {
        "probe": "NVML: 2 GPU(s)",
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA H100",
                "kind": "gpu",
                "total": 80 * GIB,
                "used": 60 * GIB,
                "fraction": 0.75,
                "processes": {"1234": 40 * GIB, "99": 512 * MIB},
            },
            {
                "index": 1,
                "name": "NVIDIA GB10",
                "kind": "unified",
                "total": 128 * GIB,
                "used": 32 * GIB,
                "fraction": 0.25,
                "processes": None,
            },
        ],
        "problem": None,
    }
    assert scripted.closed


def test_probe_text_in_process(scripted: ScriptedProbe, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "probe: NVML: 2 GPU(s)",
        "device 0: NVIDIA H100 (gpu): 60.00 / 80.00 GiB used (75.0%)",
        "  pid 1234: 40960.0 MiB",
        "  pid 99: 512.0 MiB",
        "device 1: NVIDIA GB10 (unified): 32.00 / 128.00 GiB used (25.0%)",
        "  processes: unknown",
    ]
    assert scripted.closed


def test_probe_read_failure_exits_1(
    scripted: ScriptedProbe, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.reading = OSError("GPU is lost")
    assert cli.main(["probe"]) == 1
    assert "reading failed: OSError('GPU is lost')" in capsys.readouterr().err
    assert scripted.closed


def test_probe_nonsense_reading_exits_1(
    scripted: ScriptedProbe, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.reading = MemoryReading((DeviceMemory(0, "gpu", 10, 20),))
    assert cli.main(["probe", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["problem"] == "used > total on device 0"
    assert "the reclaimer would skip this reading: used > total on device 0" in err
