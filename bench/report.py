"""The comparison table, the machine description and the micro-benchmark figures."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.scenarios import Measurement, Scenario

BASELINE = "aiosmtpd"
PRODUCT = "relate-smtp"

Getter = Callable[[Measurement], float | None]


@dataclass(frozen=True)
class Row:
    """One figure of one scenario; ``target`` is a bound on product/baseline."""

    metric: str
    get: Getter
    target: str = ""
    bound: float | None = None
    higher_is_better: bool = True
    absolute: float | None = None  # a bound on the product's own figure


def _msgs(m: Measurement) -> float | None:
    return m.result.msgs_per_s if m.result and m.result.messages else None


def _mbs(m: Measurement) -> float | None:
    return m.result.mb_per_s if m.result and m.result.messages else None


def _p(q: float) -> Getter:
    def get(m: Measurement) -> float | None:
        if not m.result or not m.result.latencies_ns:
            return None
        return m.result.percentile_ms(q)

    return get


def _cpu_median(m: Measurement) -> float | None:
    return m.median_of(lambda r: r.server_us_per_msg)


_TARGETS: dict[str, float] = {
    "c10": 1.7,  # issue 16 (issue 7 asked 1.5)
    "c100": 1.7,
    "src10": 1.5,  # issue 16: Postfix's smtp-source as the client
    "src100": 1.5,
    "pipelined": 2.0,
    "auth": 1.5,
    "sqlite20": 0.75,  # the full path against aiosmtpd's null handler
    "pg20": 0.75,
}
WORKERS_SPEEDUP = 1.3  # --workers N msg/s over one process
WORKERS_CPU = 1.15  # --workers N server CPU per message over one process, at most
PG_OVER_SQLITE = 0.8  # issue 16: pg1 msg/s over sqlite1 msg/s, at least
SENDER_AUTH_RATIO = 0.7  # issue 15: MX msg/s with the checks on over off, at least


def rows_for(scenario: Scenario) -> list[Row]:
    """The figures a scenario contributes to the table."""
    if scenario.kind == "idle":
        return [
            Row(
                "KiB/conn",
                lambda m: m.kib_per_conn,
                "≤ 8 KiB",
                higher_is_better=False,
                absolute=8.0,
            )
        ]
    if scenario.kind == "peak":
        return [Row("peak RSS MiB", lambda m: m.peak_rss_mib, "≤ 0.5x", 0.5, False)]
    if scenario.spec.message_size >= 1 << 20:
        return [Row("MB/s", _mbs, "≥ 5x", 5.0)]
    bound = _TARGETS.get(scenario.key)
    rows = [Row("msg/s", _msgs, f"≥ {bound:g}x" if bound else "", bound)]
    if scenario.key == "c10":
        # Issue 16: the per-connection cost, the median over the rounds.
        rows.append(Row("server CPU µs/msg", _cpu_median, "≤ 250 µs", None, False, 250.0))
    if scenario.key == "c100":
        rows.append(Row("p50 ms", _p(50), "", None, False))
        rows.append(Row("p99 ms", _p(99), "≤ 0.7x", 0.7, False))
    return rows


def _num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _verdict(row: Row, ratio: float | None, product: float | None) -> str:
    if row.absolute is not None and product is not None:
        ok = product <= row.absolute if not row.higher_is_better else product >= row.absolute
        return f"{row.target} {'ok' if ok else 'MISS'}"
    if row.bound is None or ratio is None:
        return row.target
    ok = ratio >= row.bound if row.higher_is_better else ratio <= row.bound
    return f"{row.target} {'ok' if ok else 'MISS'}"


def table(
    scenarios: Sequence[Scenario],
    names: Sequence[str],
    results: dict[tuple[str, str], Measurement],
) -> str:
    """A Markdown table: one line per figure, one value column per server."""
    header = [
        "scenario",
        "metric",
        *names,
        "ratio",
        "target",
        "server CPU µs/msg",
        "CPU ratio",
        "server CPU",
        "generator CPU",
        "other load",
        "errors",
    ]
    lines = [header]
    for scenario in scenarios:
        measured = [results.get((scenario.key, name)) for name in names]
        for index, row in enumerate(rows_for(scenario)):
            values = [row.get(m) if m else None for m in measured]
            base = values[names.index(BASELINE)] if BASELINE in names else None
            prod = values[names.index(PRODUCT)] if PRODUCT in names else None
            ratio = prod / base if base and prod is not None else None
            first = index == 0
            lines.append(
                [
                    scenario.title if first else "",
                    row.metric,
                    *(_cell(m, v) for m, v in zip(measured, values, strict=True)),
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    _verdict(row, ratio, prod),
                    _joined(measured, lambda m: _num(m.server_us_per_msg)) if first else "",
                    _cpu_ratio(names, measured) if first else "",
                    _joined(measured, lambda m: _pct(m.share(m.server_cpu_s))) if first else "",
                    _joined(measured, lambda m: _pct(m.result.cpu_share if m.result else None))
                    if first and scenario.kind != "idle"
                    else "",
                    _joined(measured, lambda m: _pct(m.share(m.background_cpu_s))) if first else "",
                    _joined(measured, lambda m: str(m.result.errors) if m.result else "-")
                    if first
                    else "",
                ]
            )
    return _render(lines)


def _cpu_ratio(names: Sequence[str], measured: Sequence[Measurement | None]) -> str:
    """Server CPU per message, baseline over product (above 1: the product is cheaper)."""
    if BASELINE not in names or PRODUCT not in names:
        return "-"
    base = measured[names.index(BASELINE)]
    prod = measured[names.index(PRODUCT)]
    if base is None or prod is None:
        return "-"
    b, p = base.server_us_per_msg, prod.server_us_per_msg
    return f"{b / p:.2f}x" if b and p else "-"


def _cell(m: Measurement | None, value: float | None) -> str:
    if m is not None and m.failure:
        return "failed"
    return _num(value)


def _joined(measured: Sequence[Measurement | None], get: Callable[[Measurement], str]) -> str:
    return " / ".join(get(m) if m else "-" for m in measured)


def _render(lines: list[list[str]], left: int = 2) -> str:
    """A Markdown table; the first ``left`` columns are text, the rest numbers."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def fmt(line: list[str]) -> str:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def stored_table(scenarios: Sequence[Scenario], results: dict[tuple[str, str], Measurement]) -> str:
    """Full path: the e-mails relate-smtp stored against the 250s the generator received."""
    lines = [["scenario", "store", "250 replies", 'rows added to "Emails"', "check"]]
    for scenario in scenarios:
        m = results.get((scenario.key, PRODUCT))
        if not scenario.full_path or m is None:
            continue
        if m.failure or m.accepted is None or m.stored is None:
            check = "not measured" + (f" ({m.failure.splitlines()[0]})" if m.failure else "")
        elif m.accepted == m.stored:
            check = "equal"
        else:
            check = f"MISMATCH ({m.stored - m.accepted:+d})"
        lines.append(
            [
                scenario.title,
                scenario.store,
                "-" if m.accepted is None else f"{m.accepted:,}",
                "-" if m.stored is None else f"{m.stored:,}",
                check,
            ]
        )
    if len(lines) == 1:
        return ""
    return (
        "Full path: e-mails stored by relate-smtp against 250 replies to DATA"
        " (warm-up and measured run; counted in the store afterwards)\n\n"
        + _render(lines)
        + _one_connection_ratio(results)
    )


def _figure(
    results: dict[tuple[str, str], Measurement],
    scenario: str,
    server: str,
    figure: Getter,
) -> float | None:
    """``figure`` of one server's measurement of ``scenario``; None when it was not
    measured or failed."""
    m = results.get((scenario, server))
    return figure(m) if m and not m.failure else None


def _one_connection_ratio(results: dict[tuple[str, str], Measurement]) -> str:
    """Issue 16: one connection stored in PostgreSQL against the same in SQLite."""
    a = _figure(results, "pg1", PRODUCT, _msgs)
    b = _figure(results, "sqlite1", PRODUCT, _msgs)
    if not a or not b:
        return ""
    verdict = "ok" if a / b >= PG_OVER_SQLITE else "MISS"
    return (
        f"\n\nPostgreSQL over SQLite, 1 connection: {a:,.0f} / {b:,.0f} msg/s = "
        f"{a / b:.2f}x (target ≥ {PG_OVER_SQLITE}x: {verdict})"
    )


BARE = "trio-bare"
#: Issue 16's ≤ 250 µs was set on a machine where the bare Trio responder took 188 µs
#: (the previous stop's median; the issue's own table says ~220): as a share of the
#: bare responder measured in the same run, ≤ 1.33x (1.14x by the issue's figure).
CPU_OVER_BARE = 250 / 188


def cpu_against_bare(results: dict[tuple[str, str], Measurement]) -> str:
    """Issue 16's CPU figure against the room Trio leaves on this machine, this run."""
    a = _figure(results, "c10", PRODUCT, _cpu_median)
    b = _figure(results, "c10", BARE, _cpu_median)
    if not a or not b:
        return ""
    verdict = "ok" if a / b <= CPU_OVER_BARE else "MISS"
    return (
        f"Server CPU per message, 1 msg/conn, 10 conns: relate-smtp {a:,.0f} µs, {BARE} "
        f"{b:,.0f} µs = {a / b:.2f}x the bare responder (issue 16's ≤ 250 µs, set where "
        f"it took 188 µs: ≤ {CPU_OVER_BARE:.2f}x; {verdict}; ≤ {b * CPU_OVER_BARE:,.0f} µs "
        "on this machine now)"
    )


def sender_auth_table(
    scenarios: Sequence[Scenario], results: dict[tuple[str, str], Measurement]
) -> str:
    """Issue 15: relate-smtp's MX msg/s with sender authentication on against off."""
    by_mode = {
        scenario.sender_auth: (scenario, results.get((scenario.key, PRODUCT)))
        for scenario in scenarios
        if scenario.sender_auth is not None
    }
    lines = [["sender authentication", "conns", "msg/s", "server CPU µs/msg", "errors"]]
    for mode in ("observe", "off"):
        scenario, m = by_mode.get(mode, (None, None))
        if scenario is None:
            continue
        lines.append(
            [
                mode,
                str(scenario.connections),
                _cell(m, _msgs(m) if m else None),
                _num(m.server_us_per_msg) if m else "-",
                str(m.result.errors) if m and m.result else "-",
            ]
        )
    if len(lines) == 1:
        return ""
    on = by_mode.get("observe", (None, None))[1]
    off = by_mode.get("off", (None, None))[1]
    on_rate, off_rate = (_msgs(on) if on else None), (_msgs(off) if off else None)
    verdict = "not measured"
    if on_rate and off_rate:
        ratio = on_rate / off_rate
        passed = "meets" if ratio >= SENDER_AUTH_RATIO else "MISSES"
        verdict = f"on/off = {ratio:.2f} ({passed} ≥ {SENDER_AUTH_RATIO:g})"
    return (
        "MX full path (SQLite) with SPF, DKIM and DMARC in observe mode against off "
        "(local DNS server, answers cached within their TTL)\n\n"
        + _render(lines)
        + f"\n\n{verdict}"
    )


def workers_table(
    scenarios: Sequence[Scenario], results: dict[tuple[str, str], Measurement]
) -> str:
    """relate-smtp ``--workers N`` against one process, measured back to back."""
    blocks: list[str] = []
    for scenario in scenarios:
        many = results.get((scenario.key, PRODUCT))
        if not scenario.versus_one_worker or many is None:
            continue
        one = many.one_worker
        lines = [
            [
                "relate-smtp",
                "msg/s",
                "server CPU µs/msg",
                "server CPU",
                "generator CPU",
                "other load",
                "errors",
            ]
        ]
        for label, m in ((f"--workers {scenario.workers}", many), ("one process", one)):
            lines.append(
                [
                    label,
                    _cell(m, _msgs(m) if m else None),
                    _num(m.server_us_per_msg) if m else "-",
                    _pct(m.share(m.server_cpu_s)) if m else "-",
                    _pct(m.result.cpu_share) if m and m.result else "-",
                    _pct(m.share(m.background_cpu_s)) if m else "-",
                    str(m.result.errors) if m and m.result else "-",
                ]
            )
        speed = _ratio(_msgs(many), _msgs(one) if one else None)
        cpu = _ratio(many.server_us_per_msg, one.server_us_per_msg if one else None)
        verdicts = [
            f"msg/s ratio {_x(speed)} (target ≥ {WORKERS_SPEEDUP:g}x"
            f"{_ok(speed is not None and speed >= WORKERS_SPEEDUP, speed)})",
            f"server CPU per message ratio {_x(cpu)} (target ≤ {WORKERS_CPU:g}x, i.e. within"
            f" {WORKERS_CPU * 100 - 100:.0f} %{_ok(cpu is not None and cpu <= WORKERS_CPU, cpu)})",
        ]
        blocks.append(
            f"--workers {scenario.workers} against one process ({scenario.title}; the two runs"
            " back to back, order alternating with --repeat)\n\n"
            + _render(lines, left=1)
            + "\n"
            + "; ".join(verdicts)
        )
    return "\n\n".join(blocks)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ok(ok: bool, value: float | None) -> str:
    if value is None:
        return ""
    return ": ok" if ok else ": MISS"


def machine() -> str:
    """CPU model, cores, memory, kernel, Python and package versions."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = []
    for package in ("relate-smtp", "aiosmtpd", "trio"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    rev = _git_rev()
    return (
        f"{model}, {os.cpu_count()} cores, {mem_kib / 1048576:.1f} GiB RAM; "
        f"Linux {platform.release()}; {platform.python_implementation()} "
        f"{platform.python_version()}; {', '.join(versions)}" + (f"; git {rev}" if rev else "")
    )


def _git_rev() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except OSError:
        return ""
    return done.stdout.strip()


LEGEND = """\
Values per server in column order ({names}); "a / b" cells follow the same order.
ratio: {product} / {baseline}, checked against issue 7's target.
server CPU µs/msg: user+system CPU of the server's process tree (/proc) per message.
CPU ratio: {baseline} µs/msg / {product} µs/msg (above 1: {product} is cheaper per
  message; steadier than msg/s when the machine is shared).
server CPU, generator CPU, other load: share of one core over the measured run. The
  load generator is this process (raw sockets, one epoll loop); "other load" is the rest
  of the machine (/proc/stat), which competes for the same cores.
Latency: from the write that ends the data to the 250 reply.
"stored in SQLite/PostgreSQL": relate-smtp without Storage:DiscardMessages (MIME parse and
  commit before the 250; SQLite file / temporary database made by `db init`), the other
  servers still discarding; ratio against aiosmtpd's null handler at the same concurrency.
  The PostgreSQL server's own CPU is not in "server CPU" but in "other load".
"--workers 2": relate-smtp serve --workers 2 (CPU of the parent and both workers)."""
