"""The scenarios of issue 7 and how one is measured against one target."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from bench import sender_auth, servers
from bench.loadgen import KIB, MIB, IdleConnections, LoadSpec, Result, run_load

Kind = Literal["load", "idle", "peak", "source"]


@dataclass(frozen=True)
class Target:
    """A listening SMTP server; ``pid`` (when known) is measured from /proc."""

    name: str
    host: str
    port: int
    pid: int | None = None


@dataclass(frozen=True)
class Scenario:
    """One line of the comparison (``rows`` may add derived lines, e.g. latency)."""

    key: str
    title: str
    kind: Kind
    connections: int
    spec: LoadSpec = field(default_factory=LoadSpec)
    seconds: float = 5.0
    quick_seconds: float = 1.0
    warmup: float = 1.0
    total_messages: int | None = None
    auth: bool = False
    idle_count: int = 2000
    fresh_server: bool = False
    store: servers.Store = "discard"  # relate-smtp's store; the other servers discard
    workers: int | None = None  # relate-smtp serve --workers (None: the --workers option)
    versus_one_worker: bool = False  # also measure relate-smtp with one process, paired
    # relate-smtp measured on its MX listener with the sender checks in this mode
    sender_auth: servers.SenderAuth | None = None
    source_messages: int = 4000  # kind "source": smtp-source -m (its -s is connections)

    @property
    def full_path(self) -> bool:
        """relate-smtp parses and stores each message (no ``Storage:DiscardMessages``)."""
        return self.store != "discard"


#: MX mail as the sender-authentication scenarios send it: SPF-authorised, DKIM-signed
#: (about 2.5 KiB with the signature), from a domain publishing ``p=reject``.
MX_SPEC = LoadSpec(
    sender=sender_auth.SENDER, recipient=sender_auth.RECIPIENT, sign=sender_auth.sign
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("c1", "2 KiB, 1 conn, 1 msg/conn", "load", 1),
    Scenario("c10", "2 KiB, 10 conns, 1 msg/conn", "load", 10),
    Scenario("c100", "2 KiB, 100 conns, 1 msg/conn", "load", 100),
    Scenario(
        "pipelined",
        "2 KiB, 10 conns, 100 msg/conn, pipelined",
        "load",
        10,
        LoadSpec(messages_per_connection=100),
    ),
    Scenario(
        "sequential",
        "2 KiB, 10 conns, 100 msg/conn, no pipelining",
        "load",
        10,
        LoadSpec(messages_per_connection=100, pipelined=False),
        seconds=3.0,
        quick_seconds=1.0,
    ),
    Scenario("mib10", "1 MiB, 10 conns", "load", 10, LoadSpec(message_size=MIB)),
    Scenario(
        "mib100",
        "1 MiB, 100 concurrent: peak RSS",
        "peak",
        100,
        LoadSpec(message_size=MIB),
        warmup=0.0,
        total_messages=100,
    ),
    Scenario("src10", "2 KiB, smtp-source -s 10 (HELO, no pipelining, 1 msg/conn)", "source", 10),
    Scenario(
        "src100", "2 KiB, smtp-source -s 100 (HELO, no pipelining, 1 msg/conn)", "source", 100
    ),
    Scenario("auth", "2 KiB, 10 conns, AUTH PLAIN each (warm)", "load", 10, auth=True),
    Scenario("idle", "2,000 idle conns after EHLO", "idle", 0, fresh_server=True),
    Scenario("sqlite1", "2 KiB, 1 conn, stored in SQLite", "load", 1, store="sqlite"),
    Scenario("sqlite20", "2 KiB, 20 conns, stored in SQLite", "load", 20, store="sqlite"),
    Scenario("pg1", "2 KiB, 1 conn, stored in PostgreSQL", "load", 1, store="postgres"),
    Scenario("pg20", "2 KiB, 20 conns, stored in PostgreSQL", "load", 20, store="postgres"),
    Scenario(
        "mx20",
        "2 KiB signed, 20 conns, MX stored in SQLite, SPF/DKIM/DMARC observe",
        "load",
        20,
        MX_SPEC,
        store="sqlite",
        sender_auth="observe",
    ),
    Scenario(
        "mx20off",
        "2 KiB signed, 20 conns, MX stored in SQLite, sender auth off",
        "load",
        20,
        MX_SPEC,
        store="sqlite",
        sender_auth="off",
    ),
    Scenario(
        "workers2",
        "2 KiB, 100 conns, 1 msg/conn, --workers 2",
        "load",
        100,
        workers=2,
        versus_one_worker=True,
    ),
)


@dataclass
class Measurement:
    """What one scenario gave on one target."""

    result: Result | None = None
    server_cpu_s: float | None = None
    background_cpu_s: float | None = None
    kib_per_conn: float | None = None
    peak_rss_mib: float | None = None
    rss_note: str = ""
    failure: str = ""
    notes: list[str] = field(default_factory=list)
    accepted: int | None = None  # 250s to DATA, warm-up included (full path)
    stored: int | None = None  # e-mails the store gained meanwhile (full path)
    one_worker: Measurement | None = None  # the paired single-process run (workers)
    rounds: list[Measurement] = field(default_factory=list)  # every round, when repeated

    def median_of(self, get: Callable[[Measurement], float | None]) -> float | None:
        """The median of ``get`` over the rounds (this run alone when not repeated)."""
        values = [v for m in (self.rounds or [self]) if (v := get(m)) is not None]
        return statistics.median(values) if values else None

    @property
    def server_us_per_msg(self) -> float | None:
        if self.server_cpu_s is None or not self.result or not self.result.messages:
            return None
        return self.server_cpu_s / self.result.messages * 1e6

    def share(self, seconds: float | None) -> float | None:
        """CPU seconds as a share of one core over the run's wall time."""
        if seconds is None or not self.result or not self.result.wall_s:
            return None
        return seconds / self.result.wall_s


def _spec(scenario: Scenario, auth: tuple[str, str] | None) -> LoadSpec:
    spec = scenario.spec
    if not scenario.auth:
        return spec
    assert auth is not None
    return LoadSpec(
        messages_per_connection=spec.messages_per_connection,
        message_size=spec.message_size,
        pipelined=spec.pipelined,
        auth=auth,
    )


def _warm_up(target: Target, scenario: Scenario, spec: LoadSpec, quick: bool) -> int:
    """Run the warm-up; the number of messages it got accepted."""
    if not scenario.warmup:
        return 0
    seconds = scenario.warmup / (4 if quick else 1)
    warm = run_load(
        target.host, target.port, spec, connections=scenario.connections, seconds=seconds
    )
    return warm.messages


def _load(target: Target, scenario: Scenario, spec: LoadSpec, quick: bool) -> Result:
    total = scenario.total_messages
    seconds = None if total else (scenario.quick_seconds if quick else scenario.seconds)
    return run_load(
        target.host,
        target.port,
        spec,
        connections=scenario.connections,
        seconds=seconds,
        total_messages=total,
    )


def measure(
    target: Target,
    scenario: Scenario,
    *,
    quick: bool,
    auth: tuple[str, str] | None = None,
    count_stored: Callable[[], int] | None = None,
) -> Measurement:
    """Run ``scenario`` against ``target`` and read the server's CPU and memory around it.

    ``count_stored`` (the e-mails in the server's store) is read before the warm-up and
    after the run, to compare what was stored with the 250s the generator received.
    """
    pid = target.pid
    out = Measurement()
    if scenario.kind == "idle":
        return _idle(target, scenario, out)
    if scenario.kind == "source":
        return _source(target, scenario, out)
    spec = _spec(scenario, auth)
    stored0 = count_stored() if count_stored else 0
    warm = _warm_up(target, scenario, spec, quick)
    if scenario.kind == "peak" and pid is not None and not servers.reset_peak_rss(pid):
        out.rss_note = "peak RSS since start (clear_refs not permitted)"
    cpu0 = servers.cpu_seconds(pid) if pid else None
    busy0 = servers.machine_busy_seconds()
    result = _load(target, scenario, spec, quick)
    busy = servers.machine_busy_seconds() - busy0
    out.result = result
    if count_stored is not None:
        out.accepted = warm + result.messages
        out.stored = count_stored() - stored0
    if pid is not None and cpu0 is not None:
        out.server_cpu_s = servers.cpu_seconds(pid) - cpu0
        out.background_cpu_s = max(0.0, busy - out.server_cpu_s - result.cpu_s)
        if scenario.kind == "peak":
            out.peak_rss_mib = servers.peak_rss_kib(pid) / 1024
    return out


def _run_source(target: Target, sessions: int, messages: int) -> Result:
    """One run of Postfix's smtp-source: ``messages`` of 2 KiB, ``sessions`` at a time,
    one message per session (HELO, one command per round trip)."""
    path = servers.smtp_source_path()
    if path is None:
        raise servers.ServerError("smtp-source (Postfix) is not installed")
    argv = [path, "-s", str(sessions), "-m", str(messages), "-l", "2048"]
    argv += ["-f", "bench@example.com", "-t", "rcpt@example.com"]
    argv.append(f"{target.host}:{target.port}")
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    result = Result(message_size=2048, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime)
    if process.returncode != 0:
        result.note_error(f"smtp-source exited {process.returncode}: {output.strip()[-200:]}")
    else:
        result.messages = result.connections = messages
    return result


def _source(target: Target, scenario: Scenario, out: Measurement) -> Measurement:
    pid = target.pid
    _run_source(target, scenario.connections, max(200, scenario.source_messages // 10))
    cpu0 = servers.cpu_seconds(pid) if pid else None
    busy0 = servers.machine_busy_seconds()
    result = _run_source(target, scenario.connections, scenario.source_messages)
    busy = servers.machine_busy_seconds() - busy0
    out.result = result
    if pid is not None and cpu0 is not None:
        out.server_cpu_s = servers.cpu_seconds(pid) - cpu0
        out.background_cpu_s = max(0.0, busy - out.server_cpu_s - result.cpu_s)
    return out


def _idle(target: Target, scenario: Scenario, out: Measurement) -> Measurement:
    pid = target.pid
    if scenario.warmup:
        # first sessions pay one-off costs (imports, caches): keep them out of the figure
        warm = IdleConnections(target.host, target.port, 100)
        warm.open()
        warm.close()
    idle = IdleConnections(target.host, target.port, scenario.idle_count)
    time.sleep(0.5)
    before = servers.rss_kib(pid) if pid else 0
    try:
        idle.open()
        time.sleep(0.5)
        after = servers.rss_kib(pid) if pid else 0
        opened = len(idle.sockets)
    finally:
        idle.close()
    out.result = idle.result
    if opened < scenario.idle_count:
        out.notes.append(f"only {opened} of {scenario.idle_count} sessions reached EHLO")
    if pid and opened:
        out.kib_per_conn = (after - before) / opened
    return out


def scenario_keys() -> list[str]:
    return [scenario.key for scenario in SCENARIOS]


def select(only: list[str] | None) -> list[Scenario]:
    """The scenarios named in ``only`` (all when empty), in suite order."""
    if not only:
        return list(SCENARIOS)
    wanted = {key.strip() for item in only for key in item.split(",") if key.strip()}
    unknown = wanted - set(scenario_keys())
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from "
            + ", ".join(scenario_keys())
        )
    return [scenario for scenario in SCENARIOS if scenario.key in wanted]


__all__ = ["KIB", "SCENARIOS", "Measurement", "Scenario", "Target", "measure", "select"]
