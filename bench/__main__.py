"""``python -m bench``: relate-smtp against aiosmtpd, side by side, in one run.

Every scenario runs against each server in turn (aiosmtpd first), each server in its own
process, this process being the load generator; then one table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import report, sender_auth, servers
from bench.scenarios import SCENARIOS, Measurement, Scenario, Target, measure, select

DEFAULT_KEY = "bench-api-key-0123456789abcdef"


@dataclass(frozen=True)
class Variant:
    """How a server is configured for a scenario (the relate-smtp ones vary by store)."""

    auth: bool = False
    store: servers.Store = "discard"
    workers: int | None = None
    idle: bool = False  # the idle-connections scenario
    sender_auth: servers.SenderAuth | None = None  # on the MX listener, in this mode


@dataclass
class Contender:
    """One server column: started on first use, one instance per ``Variant``."""

    name: str
    make: Callable[[Variant], servers.Server | None]
    start: Callable[[servers.Server], None] = servers.Server.start
    unavailable: str = ""
    instances: dict[Variant, servers.Server] = field(default_factory=dict)
    external: Target | None = None
    notes: list[str] = field(default_factory=list)
    retired: list[servers.Server] = field(default_factory=list)
    configurable: bool = False  # honours a scenario's store and worker count
    workers: int | None = None  # the --workers option

    def variant(self, scenario: Scenario, *, one_worker: bool = False) -> Variant:
        if not self.configurable:
            return Variant(scenario.auth, idle=scenario.kind == "idle")
        workers = None if one_worker else (scenario.workers or self.workers)
        return Variant(scenario.auth, scenario.store, workers, sender_auth=scenario.sender_auth)

    def target(self, variant: Variant) -> Target | None:
        if self.external is not None:
            return self.external
        if self.unavailable:
            raise servers.ServerError(self.unavailable)
        server = self.instances.get(variant)
        if server is None or not server.alive():
            if server is not None:
                self.notes.append(
                    f"{server.name} had died (status {server.process and server.process.poll()})"
                    "; restarted"
                )
            server = self.make(variant)
            if server is None:
                return None
            self.start(server)
            self.instances[variant] = server
        return Target(self.name, server.host, server.port, server.pid)

    def restart(self, variant: Variant) -> None:
        """Drop the running instance so the next ``target`` starts a fresh one."""
        server = self.instances.pop(variant, None)
        if server is not None:
            self._retire(server)

    def keep_only(self, needed: set[Variant]) -> None:
        """Stop the instances no later scenario needs."""
        for variant in [v for v in self.instances if v not in needed]:
            self._retire(self.instances.pop(variant))

    def _retire(self, server: servers.Server) -> None:
        server.stop()
        self.notes.extend(f"{server.name}: {note}" for note in server.notes)
        self.retired.append(server)

    def stop(self) -> None:
        for server in self.instances.values():
            server.stop()
            self.notes.extend(f"{server.name}: {note}" for note in server.notes)

    def problems(self) -> list[str]:
        return [
            f"{server.name}: {line}"
            for server in [*self.retired, *self.instances.values()]
            for line in server.problems()
        ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="relate-smtp vs aiosmtpd: throughput, latency, CPU and memory, "
        "measured side by side in one run.",
        epilog="scenarios: " + ", ".join(f"{s.key} ({s.title})" for s in SCENARIOS),
    )
    parser.add_argument("--quick", action="store_true", help="short runs (about 30 s in all)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        help="run only these scenarios (repeatable or comma-separated)",
    )
    parser.add_argument(
        "--workers", type=int, metavar="N", help="pass --workers N to relate-smtp serve"
    )
    parser.add_argument(
        "--servers",
        default="aiosmtpd,relate-smtp,trio-bare,smtp-sink",
        help="columns, in order (default: %(default)s; smtp-sink only where installed; "
        "trio-bare is bench/bare_trio.py, the room Trio leaves)",
    )
    parser.add_argument(
        "--external",
        metavar="HOST:PORT",
        help="also measure an SMTP server already listening there (no AUTH scenario)",
    )
    parser.add_argument("--external-pid", type=int, help="pid of --external, for CPU/memory")
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        metavar="N",
        help="run each scenario N times, servers alternating; keep the median run "
        "(default: %(default)s, so that one noisy round cannot carry a conclusion)",
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the per-module figures")
    parser.add_argument(
        "--store-runs",
        type=int,
        metavar="N",
        help="paired runs of the PostgreSQL write path (bench_store; default 5, quick 1)",
    )
    parser.add_argument(
        "--store-seconds",
        type=float,
        metavar="S",
        help="length of one write-path measurement (default 1.5, quick 0.5)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the raw figures")
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' working directories and logs"
    )
    return parser


def _contenders(
    args: argparse.Namespace,
    workdir: Path,
    postgres: servers.PostgresDatabase | None,
    dns_port: int = 0,
) -> list[Contender]:
    wanted = [name.strip() for name in args.servers.split(",") if name.strip()]
    found: list[Contender] = []
    for name in wanted:
        if name == "aiosmtpd":
            found.append(Contender(name, lambda v: _aiosmtpd(workdir, v.auth)))
        elif name == "relate-smtp":
            reason = servers.relate_runnable()
            found.append(
                Contender(
                    name,
                    lambda v: servers.relate_smtp(
                        workdir,
                        require_auth=v.auth,
                        workers=v.workers,
                        store=v.store,
                        postgres=postgres,
                        sender_auth=v.sender_auth,
                        dns_port=dns_port,
                    ),
                    start=servers.start_relate,
                    unavailable=f"relate-smtp cannot start: {reason}" if reason else "",
                    configurable=True,
                    workers=args.workers,
                )
            )
        elif name == "trio-bare":
            # No AUTH: it answers any command with a canned reply.
            found.append(Contender(name, lambda v: None if v.auth else servers.bare_trio(workdir)))
        elif name == "smtp-sink" and servers.smtp_sink_path():
            found.append(
                # No AUTH in smtp-sink; and its process runs out of descriptors long
                # before 2,000 idle sessions, which would then wait forever to be greeted.
                Contender(
                    name,
                    lambda v: None if v.auth or v.idle else servers.postfix_sink(workdir),
                )
            )
    if args.external:
        host, _, port = args.external.rpartition(":")
        target = Target("external", host or "127.0.0.1", int(port), args.external_pid)
        found.append(Contender("external", lambda v: None, external=target))
    return found


_credentials: tuple[str, str] = (servers.AUTH_USER, DEFAULT_KEY)


def _aiosmtpd(workdir: Path, auth: bool) -> servers.Server:
    return servers.aiosmtpd_sink(workdir, _credentials if auth else None)


def _store_counter(
    contender: Contender,
    scenario: Scenario,
    workdir: Path,
    postgres: servers.PostgresDatabase | None,
) -> Callable[[], int] | None:
    """How to count the e-mails relate-smtp stored in this scenario (None: not stored)."""
    if not contender.configurable or not scenario.full_path:
        return None
    if scenario.store == "sqlite":
        return lambda: servers.sqlite_emails(workdir / servers.SQLITE_STORE)
    if postgres is None or not postgres.created:
        raise servers.ServerError("PostgreSQL is unavailable")
    return postgres.emails


def _measure_one(
    contender: Contender,
    scenario: Scenario,
    quick: bool,
    *,
    workdir: Path,
    postgres: servers.PostgresDatabase | None,
    one_worker: bool = False,
) -> tuple[Measurement | None, str]:
    variant = contender.variant(scenario, one_worker=one_worker)
    try:
        if scenario.auth and contender.external is not None:
            return None, ""
        if scenario.fresh_server:
            contender.restart(variant)
        target = contender.target(variant)
        if target is None:
            return None, ""
        counter = _store_counter(contender, scenario, workdir, postgres)
        measurement = measure(
            target, scenario, quick=quick, auth=_credentials, count_stored=counter
        )
    except servers.ServerError as exc:
        return Measurement(failure=str(exc)), str(exc)
    except Exception as exc:  # a bench bug must not hide the other figures
        text = "".join(traceback.format_exception_only(exc)).strip()
        return Measurement(failure=text), f"{scenario.key}: {text}"
    server = contender.instances.get(variant)
    if server is not None and not server.alive():
        code = server.process.poll() if server.process else None
        measurement.failure = f"server died during {scenario.key} (status {code})"
        return measurement, f"{measurement.failure}:\n{server.log_tail(15)}"
    return measurement, ""


def _median(scenario: Scenario, measured: list[Measurement]) -> Measurement:
    """The run whose headline figure is the median (failed runs sort last)."""
    if len(measured) == 1:
        return measured[0]
    headline = report.rows_for(scenario)[0].get
    ok = [m for m in measured if not m.failure and headline(m) is not None]
    if not ok:
        return measured[0]
    ok.sort(key=lambda m: headline(m) or 0.0)
    chosen = ok[(len(ok) - 1) // 2]
    chosen.rounds = ok
    return chosen


def _micro() -> list[str]:
    lines: list[str] = []
    for module_name in ("bench.bench_message", "bench.bench_core"):
        if importlib.util.find_spec(module_name) is None:
            lines.append(f"{module_name}: not present")
            continue
        try:
            module = importlib.import_module(module_name)
            figures: dict[str, Any] = module.run()
        except Exception as exc:
            lines.append(f"{module_name}: unavailable ({type(exc).__name__}: {exc})")
            continue
        for key, value in figures.items():
            shown = f"{value:.1f}" if isinstance(value, float) else str(value)
            lines.append(f"{module_name}.{key}: {shown}")
    return lines


def _store_write_path(runs: int, seconds: float) -> str:
    """``bench.bench_store``'s table (PostgreSQL write path alone), or why it is missing."""
    try:
        module = importlib.import_module("bench.bench_store")
    except Exception as exc:
        return f"bench.bench_store: not importable ({type(exc).__name__}: {exc}); skipped"
    run = getattr(module, "run", None)
    if run is None:
        return "bench.bench_store: has no run(); skipped"
    wanted = {"seconds": seconds, "runs": runs, "sqlite": False}
    try:
        accepted: set[str] = set(inspect.signature(run).parameters)
    except (TypeError, ValueError):
        accepted = set()
    kwargs = {key: value for key, value in wanted.items() if key in accepted}
    print(f"  bench_store     {runs} paired run(s) of {seconds:g} s", file=sys.stderr, flush=True)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            figures = run(**kwargs)
    except Exception as exc:
        text = out.getvalue().strip()
        return (text + "\n" if text else "") + (
            f"bench.bench_store: failed ({type(exc).__name__}: {exc})"
        )
    text = out.getvalue().strip()
    if not text and isinstance(figures, dict):
        text = "\n".join(f"{key}: {value}" for key, value in figures.items())
    return text


def _prepare_postgres(
    chosen: Sequence[Scenario],
    contenders: Sequence[Contender],
    database: servers.PostgresDatabase,
    workdir: Path,
) -> str:
    """Create the database of the PostgreSQL full-path scenarios, when there are some."""
    relate = next((c for c in contenders if c.configurable and not c.unavailable), None)
    if relate is None or not any(s.store == "postgres" for s in chosen):
        return ""
    try:
        database.create(workdir)
    except (servers.ServerError, OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(Exception):
            database.drop()
        return f"PostgreSQL full path skipped: {exc}"
    return ""


def _variants_needed(contender: Contender, scenarios: Sequence[Scenario]) -> set[Variant]:
    needed: set[Variant] = set()
    for later in scenarios:
        needed.add(contender.variant(later))
        if later.versus_one_worker:
            needed.add(contender.variant(later, one_worker=True))
    return needed


def main(argv: Sequence[str] | None = None) -> int:
    global _credentials
    args = _parser().parse_args(argv)
    chosen = select(args.only)
    workdir = servers.temp_workdir()
    postgres = servers.PostgresDatabase()
    dns = servers.DnsProcess(workdir)
    failures: list[str] = []
    dns_port = 0
    if any(s.sender_auth for s in chosen):
        try:
            dns_port = dns.start(sender_auth.records())
        except (servers.ServerError, OSError) as exc:
            failures.append(f"MX scenarios: {exc}")
    contenders = _contenders(args, workdir, postgres, dns_port)
    names = [c.name for c in contenders]
    results: dict[tuple[str, str], Measurement] = {}
    started = time.monotonic()
    print(f"machine: {report.machine()}", file=sys.stderr)
    try:
        if "smtp-sink" in args.servers.split(",") and not servers.smtp_sink_path():
            failures.append("smtp-sink (Postfix, the C reference): not installed; no column")
        problem = _prepare_postgres(chosen, contenders, postgres, workdir)
        if problem:
            failures.append(problem)
        relate = next((c for c in contenders if c.name == report.PRODUCT), None)
        if any(s.auth for s in chosen) and relate is not None and not relate.unavailable:
            try:
                _credentials = servers.relate_credentials(workdir)
            except servers.ServerError as exc:
                failures.append(f"relate-smtp credentials: {exc}")
        remaining = list(chosen)
        for group in _groups(chosen):
            _run_group(group, contenders, args, results, failures, workdir, postgres)
            remaining = [s for s in remaining if s not in group]
            for contender in contenders:
                contender.keep_only(_variants_needed(contender, remaining))
    finally:
        for contender in contenders:
            contender.stop()
        dns.stop()
        if postgres.created:
            try:
                postgres.drop()
            except Exception as exc:
                failures.append(f"could not drop database {postgres.name}: {exc}")
    elapsed = time.monotonic() - started

    store_table = ""
    if not args.no_micro:
        micro = _micro()
        runs = args.store_runs if args.store_runs is not None else (1 if args.quick else 5)
        seconds = args.store_seconds or (0.5 if args.quick else 1.5)
        store_table = _store_write_path(runs, seconds)
    total = time.monotonic() - started

    print()
    print(
        f"## relate-smtp vs aiosmtpd ({'quick' if args.quick else 'full'} run, "
        f"{elapsed:.0f} s of scenarios, {total:.0f} s in all)"
    )
    print()
    print(f"Machine: {report.machine()}")
    print()
    print(report.table(chosen, names, results))
    print()
    print(
        report.LEGEND.format(
            names=", ".join(names), product=report.PRODUCT, baseline=report.BASELINE
        )
    )
    for section in (
        report.cpu_against_bare(results),
        report.stored_table(chosen, results),
        report.workers_table(chosen, results),
        report.sender_auth_table(chosen, results),
    ):
        if section:
            print()
            print(section)
    _print_notes(contenders, results, failures, args.workers)
    if not args.no_micro:
        print("\nPer-module figures (units in the names: _us µs of CPU per call, _mb_s MB/s):")
        for line in micro:
            print(f"  {line}")
        print("\nbench.bench_store, the PostgreSQL write path alone:")
        print("  " + store_table.replace("\n", "\n  "))
    if args.json:
        raw = {f"{key}/{name}": _jsonable(m) for (key, name), m in results.items()}
        args.json.write_text(json.dumps(raw, indent=2))
    if args.keep or any(c.problems() for c in contenders):
        print(f"\nServer logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# Scenarios compared with each other (a ratio between their rows): their rounds are
# interleaved, so a shared machine that speeds up or slows down over minutes weighs on
# both alike instead of on whichever ran in the bad minutes.
PAIRED: tuple[frozenset[str], ...] = (frozenset({"sqlite1", "pg1"}), frozenset({"mx20", "mx20off"}))


def _groups(chosen: Sequence[Scenario]) -> list[list[Scenario]]:
    """``chosen`` in order, paired scenarios (``PAIRED``) measured as one group."""
    groups: list[list[Scenario]] = []
    placed: set[str] = set()
    for scenario in chosen:
        if scenario.key in placed:
            continue
        pair = next((p for p in PAIRED if scenario.key in p), frozenset({scenario.key}))
        group = [s for s in chosen if s.key in pair]
        placed.update(s.key for s in group)
        groups.append(group)
    return groups


def _run_group(
    group: Sequence[Scenario],
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    results: dict[tuple[str, str], Measurement],
    failures: list[str],
    workdir: Path,
    postgres: servers.PostgresDatabase | None,
) -> None:
    """Measure every contender (alternating, ``--repeat`` times) and keep the medians; the
    scenarios of a group take turns within each round (order flipped every round)."""
    runs: dict[tuple[str, str], list[Measurement]] = {}
    for round_ in range(max(1, args.repeat)):
        order = group if round_ % 2 == 0 else list(reversed(group))
        for scenario in order:
            measured = _one_round(scenario, round_, contenders, args, failures, workdir, postgres)
            for name, measurement in measured.items():
                runs.setdefault((scenario.key, name), []).append(measurement)
    by_key = {scenario.key: scenario for scenario in group}
    for (key, name), measured_runs in runs.items():
        results[(key, name)] = _median(by_key[key], measured_runs)


def _one_round(
    scenario: Scenario,
    round_: int,
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    failures: list[str],
    workdir: Path,
    postgres: servers.PostgresDatabase | None,
) -> dict[str, Measurement]:
    """One round of ``scenario``: each contender in turn."""
    runs: dict[str, Measurement] = {}
    for contender in contenders:
        passes = [False]
        if scenario.versus_one_worker and contender.configurable:
            # paired: one process, then N workers, order flipped every other round
            passes = [True, False] if round_ % 2 == 0 else [False, True]
        measured: dict[bool, Measurement] = {}
        for one_worker in passes:
            label = f"  {scenario.key:<11} {contender.name}"
            if one_worker:
                label += " (one process)"
            if args.repeat > 1:
                label += f" (run {round_ + 1}/{args.repeat})"
            print(label, file=sys.stderr, flush=True)
            measurement, failure = _measure_one(
                contender,
                scenario,
                args.quick,
                workdir=workdir,
                postgres=postgres,
                one_worker=one_worker,
            )
            if measurement is not None:
                measured[one_worker] = measurement
                if measurement.accepted != measurement.stored:
                    failures.append(
                        f"{contender.name} {scenario.key}: {measurement.accepted} messages got"
                        f" 250 but {measurement.stored} e-mails were stored"
                    )
            if failure and failure not in failures:
                failures.append(f"{contender.name}: {failure}")
        main_run = measured.get(False)
        if main_run is not None:
            main_run.one_worker = measured.get(True)
            runs[contender.name] = main_run
    return runs


def _print_notes(
    contenders: list[Contender],
    results: dict[tuple[str, str], Measurement],
    failures: list[str],
    workers: int | None,
) -> None:
    notes: list[str] = []
    if workers is not None:
        notes.append(f"relate-smtp was asked for --workers {workers}")
    for contender in contenders:
        notes.extend(contender.notes)
    for (key, name), m in results.items():
        if m.result and m.result.error_samples:
            sample = m.result.error_samples[0]
            notes.append(f"{name} {key}: {m.result.errors} errors, e.g. {sample}")
        notes.extend(f"{name} {key}: {note}" for note in m.notes)
        if m.rss_note:
            notes.append(f"{name} {key}: {m.rss_note}")
    notes.extend(failures)
    for contender in contenders:
        notes.extend(contender.problems())
    if notes:
        print("\nNotes:")
        for note in dict.fromkeys(notes):  # once each, though every round may add it
            print("  - " + note.replace("\n", "\n    "))


def _jsonable(m: Measurement) -> dict[str, Any]:
    # The rounds hold the median run itself: only their headline figures go out.
    data = asdict(replace(m, rounds=[]))
    data["rounds"] = [
        {
            "msgs_per_s": r.result.msgs_per_s if r.result else None,
            "server_us_per_msg": r.server_us_per_msg,
        }
        for r in m.rounds
    ]
    if m.result is not None:
        data["result"].pop("latencies_ns", None)
        data["result"].update(
            msgs_per_s=m.result.msgs_per_s,
            mb_per_s=m.result.mb_per_s,
            p50_ms=m.result.percentile_ms(50),
            p99_ms=m.result.percentile_ms(99),
        )
    data["server_us_per_msg"] = m.server_us_per_msg
    return data


if __name__ == "__main__":
    raise SystemExit(main())
