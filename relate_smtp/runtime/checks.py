"""The health checks behind ``GET /healthz`` (SPEC §7), one factory per check; those
that talk to the network (``smtp``, ``dns-mx``) are in :mod:`.network_checks`.

Names, tags, thresholds and ``data`` keys are the original host's, because dashboards
and alerts are written against them. Each check returns a :class:`CheckResult`;
:meth:`HealthCheck.run` turns a crash or an overrun into an Unhealthy result, so one
broken check can never hide the others. :func:`run_checks` runs them concurrently and
grades the whole. The HTTP side lives in :mod:`relate_smtp.runtime.health`.

Sizes use binary units, as the original's ``1024 * 1024 * 1024`` arithmetic did, except
the memory thresholds, which the original wrote in decimal bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Literal, Protocol

import attrs
import trio

from relate_smtp.storage import ServerConnectionCounter, ServerConnections, Store, StoreError

__all__ = [
    "CheckOutcome",
    "CheckResult",
    "DiskUsage",
    "HealthCheck",
    "HealthReport",
    "HealthStatus",
    "StatusLike",
    "certificate_check",
    "connection_pool_check",
    "current_rss",
    "database_check",
    "disk_space_check",
    "error_message",
    "grade_connections",
    "grade_disk",
    "memory_check",
    "run_checks",
    "worst",
]

log = logging.getLogger("relate_smtp.health")

HealthStatus = Literal["Healthy", "Degraded", "Unhealthy"]
_SEVERITY: Final[Mapping[HealthStatus, int]] = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2}

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB

DEFAULT_CHECK_TIMEOUT: Final = 10.0
# The original gave the database and SMTP probes 5 s each.
PROBE_TIMEOUT: Final = 5.0

POOL_DEGRADED_PERCENT: Final = 80.0
POOL_UNHEALTHY_PERCENT: Final = 95.0
DISK_DEGRADED_BELOW: Final = 1 * GIB
DISK_UNHEALTHY_BELOW: Final = 100 * MIB
MEMORY_DEGRADED_AT: Final = 1_500_000_000
MEMORY_UNHEALTHY_AT: Final = 1_900_000_000
_MEMORY_GRADES: Final[tuple[tuple[HealthStatus, int], ...]] = (
    ("Unhealthy", MEMORY_UNHEALTHY_AT),
    ("Degraded", MEMORY_DEGRADED_AT),
)


@attrs.frozen(kw_only=True)
class CheckResult:
    """One check's verdict, as the health JSON shows it."""

    status: HealthStatus
    description: str | None = None
    exception: str | None = None
    """The failure's message; never a traceback (the endpoint is unauthenticated)."""
    data: Mapping[str, object] | None = attrs.field(default=None, hash=False)


class StatusLike(Protocol):
    """Any verdict with a status, a description and data: :class:`CheckResult`, or the
    TLS module's ``CertificateStatus``, without this module importing it."""

    @property
    def status(self) -> HealthStatus: ...

    @property
    def description(self) -> str | None: ...

    @property
    def data(self) -> Mapping[str, object] | None: ...


@attrs.frozen(kw_only=True)
class HealthCheck:
    """A named check; ``probe`` does the work, :meth:`run` makes it safe to await."""

    name: str
    tags: tuple[str, ...]
    probe: Callable[[], Awaitable[CheckResult]]
    timeout: float = DEFAULT_CHECK_TIMEOUT
    """Past this the check is Unhealthy, whatever the probe's own deadline says."""

    async def run(self) -> CheckResult:
        """The probe's result; Unhealthy with the message if it raises or overruns."""
        with trio.move_on_after(self.timeout):
            try:
                return await self.probe()
            except Exception as exc:
                # A crashing check must not take /healthz down with it: report it as
                # the original's HealthCheckService did (message as description too).
                log.warning("health check %s failed", self.name, exc_info=True)
                message = error_message(exc)
                return CheckResult(status="Unhealthy", description=message, exception=message)
        message = f"The check did not complete within {self.timeout:g} s"
        return CheckResult(status="Unhealthy", description=message, exception=message)


@attrs.frozen(kw_only=True)
class CheckOutcome:
    """A check's result with what the report shows beside it."""

    check: HealthCheck
    result: CheckResult
    duration: float
    """Seconds."""


@attrs.frozen(kw_only=True)
class HealthReport:
    status: HealthStatus
    """The worst of the checks' statuses; Healthy when there are none."""
    total_duration: float
    """Seconds."""
    outcomes: tuple[CheckOutcome, ...]


async def run_checks(checks: Sequence[HealthCheck]) -> HealthReport:
    """Run every check concurrently, so the slowest bounds the response, not the sum."""
    outcomes: list[CheckOutcome | None] = [None] * len(checks)
    started = trio.current_time()

    async def one(index: int, check: HealthCheck) -> None:
        begin = trio.current_time()
        result = await check.run()
        duration = trio.current_time() - begin
        outcomes[index] = CheckOutcome(check=check, result=result, duration=duration)

    async with trio.open_nursery() as nursery:
        for index, check in enumerate(checks):
            nursery.start_soon(one, index, check)
    done = tuple(o for o in outcomes if o is not None)
    return HealthReport(
        status=worst(o.result.status for o in done),
        total_duration=trio.current_time() - started,
        outcomes=done,
    )


def worst(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """The most severe status; Healthy for none."""
    return max(statuses, key=_SEVERITY.__getitem__, default="Healthy")


def error_message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- database


def database_check(store: Store, *, timeout: float = PROBE_TIMEOUT) -> HealthCheck:
    """``database``: a trivial query answers within ``timeout``."""

    async def probe() -> CheckResult:
        with trio.move_on_after(timeout):
            try:
                await store.ping()
            except Exception as exc:
                # Any driver error means the database cannot serve us right now.
                return CheckResult(
                    status="Unhealthy",
                    description="Database query failed",
                    exception=error_message(exc),
                )
            return CheckResult(status="Healthy")  # the original's DbContext check: no text
        message = f"Database did not answer within {timeout:g} s"
        return CheckResult(status="Unhealthy", description=message, exception=message)

    return HealthCheck(name="database", tags=("infrastructure",), probe=probe, timeout=timeout + 1)


def connection_pool_check(store: Store, *, timeout: float = PROBE_TIMEOUT) -> HealthCheck:
    """``connection-pool``: the database server's sessions on this database against its
    ``max_connections`` (≤ 80 % / > 80 % / > 95 %), as the original measured them.

    Never this process's pool: a busy pool is normal under load, and reporting it would
    take a working host out of rotation just when it is needed. The embedded store has
    no server to run out of connections.
    """

    async def probe() -> CheckResult:
        if not isinstance(store, ServerConnectionCounter):
            return CheckResult(
                status="Healthy",
                description="Embedded database: no connection limit",
                data={"backend": "sqlite"},
            )
        with trio.move_on_after(timeout):
            try:
                counts = await store.server_connections()
            except StoreError as exc:
                return CheckResult(
                    status="Unhealthy",
                    description="Failed to query connection pool statistics",
                    exception=error_message(exc),
                )
            return grade_connections(counts)
        message = f"Database did not answer within {timeout:g} s"
        return CheckResult(status="Unhealthy", description=message, exception=message)

    return HealthCheck(name="connection-pool", tags=("database",), probe=probe, timeout=timeout + 1)


def grade_connections(counts: ServerConnections) -> CheckResult:
    """The original's verdict and wording; both thresholds are strict (``>``)."""
    percent = 100.0 * counts.active / counts.maximum if counts.maximum > 0 else 0.0
    summary = f"{counts.active}/{counts.maximum} connections ({percent:.1f}%)"
    status: HealthStatus
    if percent > POOL_UNHEALTHY_PERCENT:
        status, summary = "Unhealthy", f"Connection pool near exhaustion: {summary}"
    elif percent > POOL_DEGRADED_PERCENT:
        status, summary = "Degraded", f"Connection pool pressure: {summary}"
    else:
        status = "Healthy"
    data = {
        "activeConnections": counts.active,
        "maxConnections": counts.maximum,
        "usedPercent": percent,
    }
    return CheckResult(status=status, description=summary, data=data)


# --------------------------------------------------------------------------- system


@attrs.frozen
class DiskUsage:
    """Bytes, as :func:`shutil.disk_usage` reports them."""

    total: int
    used: int
    free: int


def _disk_usage_of(path: str) -> DiskUsage:
    # The store's file may not exist yet (fresh SQLite): measure the disk it will be on.
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    usage = shutil.disk_usage(probe)
    return DiskUsage(total=usage.total, used=usage.used, free=usage.free)


def disk_space_check(
    path: str, *, usage: Callable[[str], DiskUsage] = _disk_usage_of
) -> HealthCheck:
    """``disk-space``: free space on the disk holding ``path`` (≥ 1 GB / < 1 GB / < 100 MB)."""

    async def probe() -> CheckResult:
        # statvfs can block on a network filesystem; keep it off the event loop.
        disk = await trio.to_thread.run_sync(usage, path, abandon_on_cancel=True)
        return grade_disk(disk)

    return HealthCheck(name="disk-space", tags=("system",), probe=probe)


def grade_disk(disk: DiskUsage) -> CheckResult:
    """The original's verdict, data (unrounded) and wording."""
    used_percent = 100.0 * (disk.total - disk.free) / disk.total if disk.total > 0 else 0.0
    data = {
        "availableGB": disk.free / GIB,
        "totalGB": disk.total / GIB,
        "usedPercent": used_percent,
    }
    used = f"({used_percent:.1f}% used)"
    if disk.free < DISK_UNHEALTHY_BELOW:
        text = f"Disk space critically low: {disk.free / MIB:.0f} MB available {used}"
        return CheckResult(status="Unhealthy", description=text, data=data)
    available = f"{disk.free / GIB:.2f} GB available {used}"
    if disk.free < DISK_DEGRADED_BELOW:
        return CheckResult(status="Degraded", description=f"Disk space low: {available}", data=data)
    return CheckResult(status="Healthy", description=available, data=data)


def current_rss() -> int:
    """Resident set size of this process in bytes.

    ``VmRSS`` is the current figure (the original reported the working set, its
    Windows equivalent). Where /proc is missing, ``ru_maxrss`` (the peak, in KiB on
    Linux, bytes on macOS) is the best the platform offers.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * KIB


def memory_check(*, rss: Callable[[], int] = current_rss) -> HealthCheck:
    """``memory``: resident memory (< 1.5 GB / ≥ 1.5 GB / ≥ 1.9 GB, decimal as the
    original's 1_500_000_000 and 1_900_000_000 bytes)."""

    async def probe() -> CheckResult:
        used = rss()
        data = {"workingSetMB": used / MIB}
        working_set = f"Working set {used / MIB:.0f} MB"
        for status, threshold in _MEMORY_GRADES:
            if used >= threshold:
                text = f"{working_set} exceeds {threshold / MIB:.0f} MB threshold"
                return CheckResult(status=status, description=text, data=data)
        return CheckResult(status="Healthy", description=working_set, data=data)

    return HealthCheck(name="memory", tags=("system",), probe=probe)


# --------------------------------------------------------------------------- tls


def certificate_check(evaluate: Callable[[], StatusLike]) -> HealthCheck:
    """``certificate``: whatever ``evaluate`` says about the served certificate.

    The grading (days left, unreadable file) belongs to the TLS module; the server wires
    e.g. ``lambda: certificates.status(datetime.now(UTC))`` here.
    """

    async def probe() -> CheckResult:
        verdict = evaluate()
        return CheckResult(
            status=verdict.status,
            description=verdict.description,
            data=dict(verdict.data) if verdict.data is not None else None,
        )

    return HealthCheck(name="certificate", tags=("tls",), probe=probe)
