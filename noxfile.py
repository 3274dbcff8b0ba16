"""Developer sessions: tests, lint, typecheck, fuzz, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (PostgreSQL tests fail, not skip, when CI=true)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy")


@nox.session
def fuzz(session: nox.Session) -> None:
    """Run the protocol fuzz target for many more examples than CI does."""
    session.install("-e", ".[test]")
    session.run(
        "pytest", "tests/protocol/test_fuzz.py", env={"RELATE_SMTP_FUZZ_EXAMPLES": "200000"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print figures (throughput, CPU per message, memory)."""
    session.install("-e", ".[test]", "aiosmtpd>=1.4")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Bounded soak (a few minutes): 500 connections of good, hostile and idle clients in
    two rounds; checks descriptors, tasks, RSS and message accounting, prints figures."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "soak.run", *session.posargs)
