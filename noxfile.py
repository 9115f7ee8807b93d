"""Sessions: tests, lint, typing, bench, demo, soak (opt-in, not in CI)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (what CI runs)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "watchdog_async", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "watchdog_async", "tests", "examples", "benchmarks")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict on the package and its tests."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "watchdog_async", "tests", "examples", "benchmarks")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Every benchmark, each printing its ratios next to its target."""
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The narrated demo with real subprocess backends."""
    session.install("-e", ".")
    session.run("python", "-m", "watchdog_async", "demo")


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """About 60 s of real backends under load (not in CI)."""
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/soak.py", *session.posargs)
