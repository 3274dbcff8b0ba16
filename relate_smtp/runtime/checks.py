"""The health checks behind ``GET /healthz`` (SPEC §7), one factory per check.

Names, tags, thresholds and ``data`` keys are the original host's, because dashboards
and alerts are written against them. Each check returns a :class:`CheckResult`;
:meth:`HealthCheck.run` turns a crash or an overrun into an Unhealthy result, so one
broken check can never hide the others. :func:`run_checks` runs them concurrently and
grades the whole. The HTTP side lives in :mod:`relate_smtp.runtime.health`.

Sizes use binary units, as the original's ``1024 * 1024 * 1024`` arithmetic did, except
the memory thresholds, which the original wrote in decimal bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Literal, Protocol

import attrs
import trio

from relate_smtp.runtime.proxy import LOCAL_V2_HEADER
from relate_smtp.storage import ServerConnectionCounter, ServerConnections, Store, StoreError

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
    "grade_connections",
    "grade_disk",
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
MEMORY_DEGRADED_AT: Final = 1_500_000_000
MEMORY_UNHEALTHY_AT: Final = 1_900_000_000
_MEMORY_GRADES: Final[tuple[tuple[HealthStatus, int], ...]] = (
    ("Unhealthy", MEMORY_UNHEALTHY_AT),
    ("Degraded", MEMORY_DEGRADED_AT),
)
# The original named the top three exchanges in its description.
_MX_SHOWN: Final = 3
# After QUIT the probe waits this long for the 221 so the session ends cleanly; the
# original did not wait at all, so a missing 221 is no failure.
_QUIT_GRACE: Final = 1.0

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
                    exception=_message(exc),
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
    """``smtp``: the submission listener greets with 220; the probe then sends QUIT.

    With ``proxy_local`` (the listener expects PROXY headers) the probe first sends a
    v2 LOCAL header, which tells the listener to keep the socket's own peer address;
    the probe's address must then be in ``Smtp:ProxyProtocol:TrustedNetworks``.
    Descriptions are the original's, which name the port.
    """

    async def probe() -> CheckResult:
        try:
            with trio.fail_after(timeout):
                unexpected = await _greet_and_quit(host, port, proxy_local)
        except trio.TooSlowError:
            return _smtp_not_responding(port, f"No SMTP greeting within {timeout:g} s")
        except (OSError, trio.BrokenResourceError, _SmtpProbeFailed) as exc:
            return _smtp_not_responding(port, _message(exc))
        if unexpected is not None:
            text = f"SMTP server on port {port} returned unexpected greeting: {unexpected}"
            return CheckResult(status="Unhealthy", description=text)
        text = f"SMTP server accepting connections on port {port}"
        return CheckResult(status="Healthy", description=text)

    return HealthCheck(name="smtp", tags=("protocol",), probe=probe, timeout=timeout + 1)


def _smtp_not_responding(port: int, reason: str) -> CheckResult:
    text = f"SMTP server on port {port} is not responding"
    return CheckResult(status="Unhealthy", description=text, exception=reason)


async def _greet_and_quit(host: str, port: int, proxy_local: bool) -> str | None:
    """None after a 220 greeting (QUIT sent); else the greeting's line, as text."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        if proxy_local:
            await stream.send_all(LOCAL_V2_HEADER)
        buf = bytearray()
        code, line = await _read_reply(stream, buf)
        if code != 220:
            return line[:200].decode("ascii", "replace")
        await stream.send_all(b"QUIT\r\n")
        with trio.move_on_after(_QUIT_GRACE):
            with contextlib.suppress(OSError, trio.BrokenResourceError, _SmtpProbeFailed):
                await _read_reply(stream, buf)
    return None


MxResolver = Callable[[str], Awaitable[Sequence[str]]]
"""Returns the MX exchange names of a domain; empty when it has none."""


async def resolve_mx(domain: str, *, lifetime: float = PROBE_TIMEOUT) -> Sequence[str]:
    """MX exchanges of ``domain``, most preferred first, through the system's resolvers
    (dnspython, Trio backend).

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
    ranked = sorted(answer, key=lambda record: int(record.preference))
    return tuple(str(record.exchange) for record in ranked)


def dns_mx_check(
    domain: str, *, resolve: MxResolver = resolve_mx, timeout: float = PROBE_TIMEOUT
) -> HealthCheck:
    """``dns-mx``: the MX lookup of ``domain`` answers; the original's texts and data.

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
            return _mx_failed(_message(exc))
        if exchanges is None:
            return _mx_failed(f"MX lookup for {domain} did not answer within {timeout:g} s")
        data = {"testDomain": domain, "mxRecordCount": len(exchanges)}
        if not exchanges:
            text = f"No MX records returned for {domain}"
            return CheckResult(status="Degraded", description=text, data=data)
        hosts = ", ".join(name.rstrip(".") for name in exchanges[:_MX_SHOWN])
        text = f"DNS MX resolution working ({domain} → {hosts})"
        return CheckResult(status="Healthy", description=text, data=data)

    return HealthCheck(name="dns-mx", tags=("smtp",), probe=probe, timeout=timeout + 1)


def _mx_failed(reason: str) -> CheckResult:
    return CheckResult(status="Degraded", description="DNS MX resolution failed", exception=reason)


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
