"""Bounded soak of the real server (``nox -s soak``; ``python -m soak.run --help``).

A server process (``soak/server.py``: ``relate-smtp serve --dev-tls`` on an embedded
store, with the corpus's short clocks) takes 500 concurrent connections for two
identical rounds: half good senders (five messages a session, session after session),
three in ten replaying the hostile-input corpus (``tests/robustness/corpus.py``), two
in ten idle clients that connect and wait to be cut. A short warm-up first brings the
store's connection pool and the worker threads to their working size.

After each round the driver waits until the server reports no open session, then reads
the server's open file descriptors and RSS from /proc and its Trio task count (SIGUSR1
probe). It checks that descriptors and tasks are back at their count before the first
round, that the second round adds no more than 5 % RSS over the first, and the message
accounting: every 250 stored once, nothing refused stored, the store's total equal to
what the server's session summaries report. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from relate_smtp.storage.sqlite import DEFAULT_MAX_THREADS
from tests.robustness.corpus import (
    CASES,
    COMMAND_TIMEOUT,
    CORPUS_SETTINGS,
    SLACK,
    CutByClock,
    Target,
)
from tests.robustness.helpers import (
    Ledger,
    Peer,
    PeerClosed,
    Progress,
    Traffic,
    account,
    sender,
    sqlite_stored,
)

# The host is in brackets when it is IPv6: "[::]:2525", "0.0.0.0:2525".
LISTENING = re.compile(r"Listening: (\S+) on (\[[^\]\s]+\]|[^\s:]+):(\d+) \((\w+)\)")
SUMMARY_MESSAGES = re.compile(r" session \S+ listener=.* messages=(\d+) ")
RSS_GROWTH_LIMIT = 0.05
# The SQLite store keeps up to one connection per worker thread (the database file and
# its WAL each), opened on demand: its high-water mark is bounded, not a leak.
STORE_POOL_MAX = DEFAULT_MAX_THREADS
WARM_UP = 5.0  # seconds of the round's mix before the baseline is read
# How long a closed session's descriptor and task may take to go once none is open.
SETTLE_TIMEOUT = 10.0
SOAK_CASES = tuple(case for case in CASES if case.xfail is None)


# --------------------------------------------------------------------------- the server


class ServerProcess:
    """The soak server; its stderr is read by a thread into ``lines``."""

    def __init__(self, workdir: Path, *overrides: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soak.server", *(f"--{o}" for o in overrides)],
            cwd=Path(__file__).resolve().parent.parent,
            env={k: v for k, v in os.environ.items() if "__" not in k},
            stderr=subprocess.PIPE,
            text=True,
        )
        self.workdir = workdir
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                if match := LISTENING.search(line):
                    self.ports[match.group(1)] = int(match.group(3))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 30.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"server never logged {pattern!r}:\n{''.join(self.lines)}")
                self._cond.wait(remaining)

    def tasks(self) -> int:
        with self._cond:
            after = len(self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        line = self.wait_for(r"soak-probe tasks=", after=after)
        return int(line.rsplit("=", 1)[1])

    def fds(self) -> tuple[str, ...]:
        """What each open descriptor refers to (sockets and pipes by kind only)."""
        directory = f"/proc/{self.proc.pid}/fd"
        targets = []
        for fd in os.listdir(directory):
            try:
                target = os.readlink(f"{directory}/{fd}")
            except FileNotFoundError:
                continue
            targets.append(re.sub(r":\[\d+\]$", "", target))
        return tuple(sorted(targets))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))

    def log_since(self, index: int) -> list[str]:
        with self._cond:
            return self.lines[index:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


@attrs.frozen
class Resources:
    open_files: tuple[str, ...]
    rss_kib: int
    tasks: int

    @property
    def fds(self) -> int:
        return len(self.open_files)

    def line(self) -> str:
        return f"fds={self.fds} rss={self.rss_kib / 1024:.1f} MiB tasks={self.tasks}"

    def split(self, db_path: Path) -> tuple[int, int]:
        """(descriptors other than the store's files, the store's files)."""
        store = sum(1 for target in self.open_files if target.startswith(str(db_path)))
        return self.fds - store, store

    def fd_difference(self, other: Resources) -> str:
        more = Counter(self.open_files) - Counter(other.open_files)
        fewer = Counter(other.open_files) - Counter(self.open_files)
        return f"+{dict(more)} -{dict(fewer)}"


async def active_sessions(health_port: int) -> float:
    """``smtp_active_connections`` from /metrics, on a connection the server closes
    (so that it holds no descriptor for it once the answer is read)."""
    stream = await trio.open_tcp_stream("127.0.0.1", health_port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        response = b""
        while data := await stream.receive_some(65536):
            response += data
    match = re.search(rb"^smtp_active_connections (\S+)$", response, re.M)
    assert match is not None, response[:500]
    return float(match.group(1))


async def quiet(
    server: ServerProcess,
    health_port: int,
    like: Resources | None = None,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> Resources:
    """Wait for no open session, then read the process's figures until they match
    ``like`` (or, without it, until two readings agree) or ``timeout`` passes.

    The server cannot say when a closed connection's descriptor and task are gone (the
    health listener lingers on its own connections), and /proc cannot notify: poll.
    """
    with trio.move_on_after(timeout):
        while await active_sessions(health_port) != 0:  # noqa: ASYNC110 - a remote gauge
            await trio.sleep(0.2)
    deadline = trio.current_time() + SETTLE_TIMEOUT
    previous: Resources | None = None
    while True:
        tasks = await trio.to_thread.run_sync(server.tasks)
        current = Resources(server.fds(), server.rss_kib(), tasks)
        target = like or previous
        if target is not None and (current.fds, current.tasks) == (target.fds, target.tasks):
            return current
        if trio.current_time() > deadline:
            return current
        previous = current
        await trio.sleep(0.2)


# --------------------------------------------------------------------------- clients


@attrs.define
class RoundFigures:
    ledger: Ledger = attrs.field(factory=Ledger)
    progress: Progress = attrs.field(factory=Progress)
    inputs: Counter[str] = attrs.field(factory=Counter)
    unexpected: list[str] = attrs.field(factory=list)
    cut_by_clock: Counter[str] = attrs.field(factory=Counter)
    idle: int = 0
    idle_not_cut: int = 0
    expected: list[tuple[str, int]] = attrs.field(factory=list)


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's --dev-tls certificate
    return context


async def good(port: int, tag: str, figures: RoundFigures, deadline: float) -> None:
    traffic = Traffic(to=("rcpt@example.com",), count=5, rows=1)
    for session in itertools.count():
        if trio.current_time() >= deadline:
            return
        await sender(port, f"{tag}-{session}", traffic, figures.ledger, figures.progress)


async def hostile(
    port: int, start: int, figures: RoundFigures, deadline: float, tls: ssl.SSLContext
) -> None:
    for n in itertools.count(start):
        if trio.current_time() >= deadline:
            return
        case = SOAK_CASES[n % len(SOAK_CASES)]
        target = Target(port=port, client_tls=tls)
        figures.inputs[case.name] += 1
        try:
            await case.run(target)
        except CutByClock:
            figures.cut_by_clock[case.name] += 1
        except Exception as exc:  # a case's failed expectation is a finding, not a crash
            figures.unexpected.append(f"{case.name}: {type(exc).__name__}: {exc}"[:300])
        figures.expected.extend(target.expected)


async def idle(port: int, figures: RoundFigures, deadline: float) -> None:
    while trio.current_time() < deadline:
        figures.idle += 1
        try:
            peer = await Peer.connect(port)
        except (OSError, PeerClosed, AssertionError):
            figures.idle_not_cut += 1
            continue
        try:
            codes = await peer.until_closed(timeout=COMMAND_TIMEOUT + 3 * SLACK)
            if codes != [421]:
                figures.idle_not_cut += 1
        except trio.TooSlowError:
            figures.idle_not_cut += 1
        finally:
            await peer.aclose()


async def run_round(port: int, connections: int, duration: float) -> RoundFigures:
    figures = RoundFigures()
    deadline = trio.current_time() + duration
    tls = client_tls()
    async with trio.open_nursery() as nursery:
        for slot in range(connections):
            role = slot % 10
            if role < 5:
                nursery.start_soon(good, port, f"g{slot}", figures, deadline)
            elif role < 8:
                nursery.start_soon(hostile, port, slot, figures, deadline, tls)
            else:
                nursery.start_soon(idle, port, figures, deadline)
    return figures


# --------------------------------------------------------------------------- the soak


@attrs.define
class Report:
    failures: list[str] = attrs.field(factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)


async def soak(args: argparse.Namespace) -> int:
    report = Report()
    with tempfile.TemporaryDirectory(prefix="relate-soak-") as tmp:
        workdir = Path(tmp)
        db_path = workdir / "soak.db"
        server = ServerProcess(
            workdir,
            "Smtp:Port=0",
            "Smtp:SecurePort=0",
            "HealthCheck:Url=http://127.0.0.1:0",
            "HealthCheck:DnsMxDomain=",
            f"Storage:SqlitePath={db_path}",
            "Security:AuthenticationSalt=soak",
            f"Smtp:MaxConnections={2 * args.connections}",
            *CORPUS_SETTINGS,
        )
        try:
            await trio.to_thread.run_sync(
                functools.partial(server.wait_for, r"Listening: health on ")
            )
            port, health = server.ports["submission"], server.ports["health"]
            cold = await quiet(server, health)
            print(f"server pid {server.proc.pid}; cold start: {cold.line()}")
            await run_round(port, args.connections, WARM_UP)
            baseline = await quiet(server, health)
            print(f"after warm-up (baseline): {baseline.line()}")

            after: list[Resources] = []
            for number in range(1, args.rounds + 1):
                started = time.monotonic()
                figures = await run_round(port, args.connections, args.duration)
                figures_time = time.monotonic() - started
                resources = await quiet(server, health, baseline)
                after.append(resources)
                server_reported = sum(
                    int(m.group(1))
                    for line in server.log_since(0)
                    if (m := SUMMARY_MESSAGES.search(line))
                )
                print_round(number, figures, figures_time, resources, baseline)
                check_round(report, figures, resources, baseline, db_path, server_reported)

            if len(after) >= 2:
                growth = (after[1].rss_kib - after[0].rss_kib) / after[0].rss_kib
                report.check(
                    growth <= RSS_GROWTH_LIMIT,
                    f"round 2 RSS {growth:+.1%} over round 1 (limit +{RSS_GROWTH_LIMIT:.0%})",
                )
            problems = [
                line.rstrip()
                for line in server.log_since(0)
                if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
            ]
            report.check(not problems, f"no error or traceback in the server log {problems[:3]}")
        finally:
            code = await trio.to_thread.run_sync(server.stop)
        report.check(code == 0, f"server exited {code} on SIGTERM")
    if report.failures:
        print(f"SOAK FAILED: {len(report.failures)} check(s)")
        return 1
    print("SOAK PASSED")
    return 0


def print_round(
    number: int, figures: RoundFigures, seconds: float, resources: Resources, baseline: Resources
) -> None:
    ledger = figures.ledger
    hostile = sum(figures.inputs.values())
    print(f"round {number}: {seconds:.0f} s")
    print(
        f"  inputs tried: {hostile} hostile connections over {len(figures.inputs)} corpus"
        f" cases, {figures.idle} idle clients, {len(ledger.told)} messages from good senders"
    )
    print(f"  faults injected: {hostile + figures.idle} (hostile + idle connections)")
    for name, count in sorted(figures.inputs.items()):
        print(f"    {count:5d}  {name}")
    print(f"  replies to good senders: {dict(sorted(ledger.codes.items()))}")
    print(f"  resources before: {baseline.line()}")
    print(f"  resources after:  {resources.line()}")
    for name, count in sorted(figures.cut_by_clock.items()):
        print(f"  cut with 421 by the 2 s command clock under load: {name} x{count}")
    for line in figures.unexpected[:10]:
        print(f"  unexpected: {line}")


def check_round(
    report: Report,
    figures: RoundFigures,
    resources: Resources,
    baseline: Resources,
    db_path: Path,
    server_reported: int,
) -> None:
    stored, orphans = sqlite_stored(str(db_path))
    try:
        figures_line = account(figures.ledger, stored, commits_observed=False).line()
        accounting_ok = True
    except AssertionError as exc:
        figures_line, accounting_ok = f"accounting failed: {exc}", False
    print(f"  messages: {figures_line}")
    total = sum(len(copies) for copies in stored.values())
    report.check(accounting_ok, "every 250 stored once, nothing refused stored")
    report.check(orphans == 0, f"no orphaned rows ({orphans})")
    report.check(
        total == server_reported,
        f"stored in all ({total}) = reported by the server's session summaries ({server_reported})",
    )
    wrong = [(m, c) for m, c in figures.expected if len(stored.get(m, [])) != c]
    report.check(not wrong, f"corpus messages stored as expected ({len(figures.expected)})")
    report.check(not figures.unexpected, f"hostile cases as expected ({len(figures.unexpected)})")
    report.check(
        figures.idle_not_cut == 0, f"idle clients cut with 421 ({figures.idle_not_cut} not)"
    )
    sockets, files = resources.split(db_path), baseline.split(db_path)
    report.check(
        sockets[0] == files[0],
        f"sockets, pipes and other fds back to {files[0]} ({sockets[0]};"
        f" {resources.fd_difference(baseline)})",
    )
    report.check(
        sockets[1] <= 2 * STORE_POOL_MAX,
        f"store files open: {sockets[1]} (at start {files[1]}; pool bound {2 * STORE_POOL_MAX})",
    )
    report.check(
        resources.tasks == baseline.tasks, f"tasks back to {baseline.tasks} ({resources.tasks})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
