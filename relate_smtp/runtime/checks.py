"""The health checks behind ``GET /healthz`` (SPEC §7), one factory per check.

Names, tags, thresholds and ``data`` keys are the original host's, because dashboards
and alerts are written against them. Each check returns a :class:`CheckResult`;
:meth:`HealthCheck.run` turns a crash or an overrun into an Unhealthy result, so one
broken check can never hide the others. :func:`run_checks` runs them concurrently and
grades the whole. The HTTP side lives in :mod:`relate_smtp.runtime.health`.

Sizes use binary units, as the original's ``1024 * 1024 * 1024`` arithmetic did.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Literal, Protocol

import attrs
import trio

from relate_smtp.runtime.proxy import LOCAL_V2_HEADER
from relate_smtp.storage import Store

__all__ = [
    "CheckOutcome",
    "CheckResult",
    "DiskUsage",
    "HealthCheck",
    "HealthReport",
    "HealthStatus",
    "MxResolver",
    "StatusLike",
    "certificate_check",
    "connection_pool_check",
    "current_rss",
    "database_check",
    "disk_space_check",
    "dns_mx_check",
    "memory_check",
    "resolve_mx",
    "run_checks",
    "smtp_check",
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
MEMORY_DEGRADED_AT: Final = int(1.5 * GIB)
MEMORY_UNHEALTHY_AT: Final = int(1.9 * GIB)

# A greeting or QUIT reply longer than this is not an SMTP server answering.
_SMTP_REPLY_LIMIT: Final = 4096


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
                message = _message(exc)
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


def _message(exc: BaseException) -> str:
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
                    exception=_message(exc),
                )
            return CheckResult(status="Healthy", description="Database is reachable")
        message = f"Database did not answer within {timeout:g} s"
        return CheckResult(status="Unhealthy", description=message, exception=message)

    return HealthCheck(name="database", tags=("infrastructure",), probe=probe, timeout=timeout + 1)


def connection_pool_check(store: Store) -> HealthCheck:
    """``connection-pool``: share of the pool in use (< 80 % / ≥ 80 % / ≥ 95 %)."""

    async def probe() -> CheckResult:
        stats = store.pool_stats()
        # A store without a bounded pool (maximum 0) cannot run out of connections.
        percent = 100.0 * stats.active / stats.maximum if stats.maximum > 0 else 0.0
        data = {
            "activeConnections": stats.active,
            "maxConnections": stats.maximum,
            "usedPercent": round(percent, 2),
        }
        summary = f"{stats.active} of {stats.maximum} connections in use ({percent:.1f}%)"
        status: HealthStatus
        if percent >= POOL_UNHEALTHY_PERCENT:
            status = "Unhealthy"
        elif percent >= POOL_DEGRADED_PERCENT:
            status = "Degraded"
        else:
            status = "Healthy"
        return CheckResult(status=status, description=summary, data=data)

    return HealthCheck(name="connection-pool", tags=("database",), probe=probe)


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
        used_percent = 100.0 * disk.used / disk.total if disk.total > 0 else 0.0
        data = {
            "availableGB": round(disk.free / GIB, 2),
            "totalGB": round(disk.total / GIB, 2),
            "usedPercent": round(used_percent, 2),
        }
        summary = f"{disk.free / GIB:.2f} GB free of {disk.total / GIB:.2f} GB"
        status: HealthStatus
        if disk.free < DISK_UNHEALTHY_BELOW:
            status = "Unhealthy"
        elif disk.free < DISK_DEGRADED_BELOW:
            status = "Degraded"
        else:
            status = "Healthy"
        return CheckResult(status=status, description=summary, data=data)

    return HealthCheck(name="disk-space", tags=("system",), probe=probe)


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
    """``memory``: resident memory (< 1.5 GB / ≥ 1.5 GB / ≥ 1.9 GB)."""

    async def probe() -> CheckResult:
        used = rss()
        megabytes = used / MIB
        status: HealthStatus
        if used >= MEMORY_UNHEALTHY_AT:
            status = "Unhealthy"
        elif used >= MEMORY_DEGRADED_AT:
            status = "Degraded"
        else:
            status = "Healthy"
        return CheckResult(
            status=status,
            description=f"Working set: {megabytes:.0f} MB",
            data={"workingSetMB": round(megabytes, 2)},
        )

    return HealthCheck(name="memory", tags=("system",), probe=probe)


# --------------------------------------------------------------------------- protocol


class _SmtpProbeFailed(Exception):
    pass


async def _read_reply(stream: trio.abc.ReceiveStream, buf: bytearray) -> tuple[int, bytes]:
    """Read one (possibly multi-line, RFC 5321 §4.2.1) reply; returns (code, last line)."""
    while True:
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > _SMTP_REPLY_LIMIT:
                raise _SmtpProbeFailed("reply line too long")
            chunk = await stream.receive_some(_SMTP_REPLY_LIMIT)
            if not chunk:
                raise _SmtpProbeFailed("server closed the connection")
            buf += chunk
            continue
        line = bytes(buf[:end])
        del buf[: end + 2]
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise _SmtpProbeFailed(f"not an SMTP reply: {line[:80]!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line


def smtp_check(
    host: str, port: int, *, proxy_local: bool, timeout: float = PROBE_TIMEOUT
) -> HealthCheck:
    """``smtp``: the submission listener greets with 220 and answers QUIT with 221.

    With ``proxy_local`` (the listener expects PROXY headers) the probe first sends a
    v2 LOCAL header, which tells the listener to keep the socket's own peer address;
    the probe's address must then be in ``Smtp:ProxyProtocol:TrustedNetworks``.
    """

    async def probe() -> CheckResult:
        target = f"{host}:{port}"
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    if proxy_local:
                        await stream.send_all(LOCAL_V2_HEADER)
                    buf = bytearray()
                    code, line = await _read_reply(stream, buf)
                    if code != 220:
                        raise _SmtpProbeFailed(f"greeting was {line[:80]!r}")
                    await stream.send_all(b"QUIT\r\n")
                    code, line = await _read_reply(stream, buf)
                    if code != 221:
                        raise _SmtpProbeFailed(f"QUIT answered {line[:80]!r}")
        except trio.TooSlowError:
            message = f"No complete SMTP exchange with {target} within {timeout:g} s"
            return CheckResult(status="Unhealthy", description=message, exception=message)
        except (OSError, trio.BrokenResourceError, _SmtpProbeFailed) as exc:
            return CheckResult(
                status="Unhealthy",
                description=f"SMTP server at {target} is not answering properly",
                exception=_message(exc),
            )
        return CheckResult(status="Healthy", description=f"SMTP server at {target} responds")

    return HealthCheck(name="smtp", tags=("protocol",), probe=probe, timeout=timeout + 1)


MxResolver = Callable[[str], Awaitable[Sequence[str]]]
"""Returns the MX exchange names of a domain; empty when it has none."""


async def resolve_mx(domain: str, *, lifetime: float = PROBE_TIMEOUT) -> Sequence[str]:
    """MX exchanges of ``domain`` through the system's resolvers (dnspython, Trio backend).

    NXDOMAIN and an empty answer both mean "no records"; other failures raise.
    """
    import dns.asyncbackend
    import dns.asyncresolver
    import dns.resolver

    try:
        answer = await dns.asyncresolver.resolve(
            domain,
            "MX",
            lifetime=lifetime,
            backend=dns.asyncbackend.get_backend("trio"),
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return ()
    return tuple(str(record.exchange) for record in answer)


def dns_mx_check(
    domain: str, *, resolve: MxResolver = resolve_mx, timeout: float = PROBE_TIMEOUT
) -> HealthCheck:
    """``dns-mx``: the MX lookup of ``domain`` answers.

    No records and failures are both Degraded, never Unhealthy: the original marked a
    DNS outage Unhealthy, which takes an inbound server out of a load balancer's
    rotation for a problem that does not stop it receiving mail.
    """

    async def probe() -> CheckResult:
        exchanges: Sequence[str] | None = None
        try:
            with trio.move_on_after(timeout):
                exchanges = await resolve(domain)
        except Exception as exc:
            # dnspython raises many types (timeouts, SERVFAIL, no nameservers); all of
            # them mean the same thing here.
            return CheckResult(
                status="Degraded",
                description=f"MX lookup for {domain} failed",
                exception=_message(exc),
            )
        if exchanges is None:
            message = f"MX lookup for {domain} did not answer within {timeout:g} s"
            return CheckResult(status="Degraded", description=message, exception=message)
        if not exchanges:
            return CheckResult(status="Degraded", description=f"No MX records for {domain}")
        return CheckResult(
            status="Healthy", description=f"{len(exchanges)} MX records found for {domain}"
        )

    return HealthCheck(name="dns-mx", tags=("smtp",), probe=probe, timeout=timeout + 1)


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
