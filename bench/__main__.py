"""``python -m bench``: relate-smtp against aiosmtpd, side by side, in one run.

Every scenario runs against each server in turn (aiosmtpd first), each server in its own
process, this process being the load generator; then one table is printed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report, servers
from bench.scenarios import SCENARIOS, Measurement, Scenario, Target, measure, select

DEFAULT_KEY = "bench-api-key-0123456789abcdef"


@dataclass
class Contender:
    """One server column: started on first use, one instance without and one with AUTH."""

    name: str
    make: Callable[[bool], servers.Server | None]
    start: Callable[[servers.Server], None] = servers.Server.start
    unavailable: str = ""
    instances: dict[bool, servers.Server] = field(default_factory=dict)
    external: Target | None = None
    notes: list[str] = field(default_factory=list)
    retired: list[servers.Server] = field(default_factory=list)

    def target(self, auth: bool) -> Target | None:
        if self.external is not None:
            return self.external
        if self.unavailable:
            raise servers.ServerError(self.unavailable)
        server = self.instances.get(auth)
        if server is None or not server.alive():
            if server is not None:
                self.notes.append(
                    f"{server.name} had died (status {server.process and server.process.poll()})"
                    "; restarted"
                )
            server = self.make(auth)
            if server is None:
                return None
            self.start(server)
            self.instances[auth] = server
        return Target(self.name, server.host, server.port, server.pid)

    def restart(self, auth: bool) -> None:
        """Drop the running instance so the next ``target`` starts a fresh one."""
        server = self.instances.pop(auth, None)
        if server is not None:
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
        default="aiosmtpd,relate-smtp,smtp-sink",
        help="columns, in order (default: %(default)s; smtp-sink only where installed)",
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
        default=1,
        metavar="N",
        help="run each scenario N times, servers alternating; keep the median run",
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the per-module figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the raw figures")
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' working directories and logs"
    )
    return parser


def _contenders(args: argparse.Namespace, workdir: Path) -> list[Contender]:
    wanted = [name.strip() for name in args.servers.split(",") if name.strip()]
    found: list[Contender] = []
    for name in wanted:
        if name == "aiosmtpd":
            found.append(Contender(name, lambda auth: _aiosmtpd(workdir, auth)))
        elif name == "relate-smtp":
            reason = servers.relate_runnable()
            found.append(
                Contender(
                    name,
                    lambda auth: servers.relate_smtp(
                        workdir, require_auth=auth, workers=args.workers
                    ),
                    start=servers.start_relate,
                    unavailable=f"relate-smtp cannot start: {reason}" if reason else "",
                )
            )
        elif name == "smtp-sink" and servers.smtp_sink_path():
            found.append(
                Contender(name, lambda auth: None if auth else servers.postfix_sink(workdir))
            )
    if args.external:
        host, _, port = args.external.rpartition(":")
        target = Target("external", host or "127.0.0.1", int(port), args.external_pid)
        found.append(Contender("external", lambda auth: None, external=target))
    return found


_credentials: tuple[str, str] = (servers.AUTH_USER, DEFAULT_KEY)


def _aiosmtpd(workdir: Path, auth: bool) -> servers.Server:
    return servers.aiosmtpd_sink(workdir, _credentials if auth else None)


def _measure_one(
    contender: Contender, scenario: Scenario, quick: bool
) -> tuple[Measurement | None, str]:
    try:
        if scenario.auth and contender.external is not None:
            return None, ""
        if scenario.fresh_server:
            contender.restart(scenario.auth)
        target = contender.target(scenario.auth)
        if target is None:
            return None, ""
        measurement = measure(target, scenario, quick=quick, auth=_credentials)
    except servers.ServerError as exc:
        return Measurement(failure=str(exc)), str(exc)
    except Exception as exc:  # a bench bug must not hide the other figures
        text = "".join(traceback.format_exception_only(exc)).strip()
        return Measurement(failure=text), f"{scenario.key}: {text}"
    server = contender.instances.get(scenario.auth)
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
    return ok[(len(ok) - 1) // 2]


def _micro() -> list[str]:
    lines: list[str] = []
    for module_name in ("bench.bench_message", "bench.bench_core"):
        if importlib.util.find_spec(module_name) is None:
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


def main(argv: Sequence[str] | None = None) -> int:
    global _credentials
    args = _parser().parse_args(argv)
    chosen = select(args.only)
    workdir = servers.temp_workdir()
    contenders = _contenders(args, workdir)
    names = [c.name for c in contenders]
    results: dict[tuple[str, str], Measurement] = {}
    failures: list[str] = []
    started = time.monotonic()
    print(f"machine: {report.machine()}", file=sys.stderr)
    try:
        relate = next((c for c in contenders if c.name == report.PRODUCT), None)
        if any(s.auth for s in chosen) and relate is not None and not relate.unavailable:
            try:
                _credentials = servers.relate_credentials(workdir)
            except servers.ServerError as exc:
                failures.append(f"relate-smtp credentials: {exc}")
        for scenario in chosen:
            runs: dict[str, list[Measurement]] = {}
            for round_ in range(max(1, args.repeat)):
                for contender in contenders:
                    label = f"  {scenario.key:<11} {contender.name}"
                    if args.repeat > 1:
                        label += f" (run {round_ + 1}/{args.repeat})"
                    print(label, file=sys.stderr, flush=True)
                    measurement, failure = _measure_one(contender, scenario, args.quick)
                    if measurement is not None:
                        runs.setdefault(contender.name, []).append(measurement)
                    if failure and failure not in failures:
                        failures.append(f"{contender.name}: {failure}")
            for name, measured in runs.items():
                results[(scenario.key, name)] = _median(scenario, measured)
    finally:
        for contender in contenders:
            contender.stop()
    elapsed = time.monotonic() - started

    print()
    print(f"## relate-smtp vs aiosmtpd ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s)")
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
    _print_notes(contenders, results, failures, args.workers)
    if not args.no_micro:
        micro = _micro()
        if micro:
            print("\nPer-module figures (µs of CPU per call):")
            for line in micro:
                print(f"  {line}")
    if args.json:
        raw = {f"{key}/{name}": _jsonable(m) for (key, name), m in results.items()}
        args.json.write_text(json.dumps(raw, indent=2))
    if args.keep or any(c.problems() for c in contenders):
        print(f"\nServer logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


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
        for note in notes:
            print("  - " + note.replace("\n", "\n    "))


def _jsonable(m: Measurement) -> dict[str, Any]:
    data = asdict(m)
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
