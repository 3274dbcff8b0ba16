"""The health checks that talk to the network: ``smtp`` (our own submission listener)
and ``dns-mx`` (SPEC §7)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import trio

from relate_smtp.runtime.checks import PROBE_TIMEOUT, CheckResult, HealthCheck, error_message
from relate_smtp.runtime.proxy import LOCAL_V2_HEADER

__all__ = ["INTERNAL_ERROR_WINDOW", "MxResolver", "dns_mx_check", "resolve_mx", "smtp_check"]

# The original named the top three exchanges in its description.
_MX_SHOWN: Final = 3
# After QUIT the probe waits this long for the 221 so the session ends cleanly; the
# original did not wait at all, so a missing 221 is no failure.
_QUIT_GRACE: Final = 1.0
# A greeting or QUIT reply longer than this is not an SMTP server answering.
_SMTP_REPLY_LIMIT: Final = 4096
# How long after the internal-error count last rose the ``smtp`` check stays Degraded.
INTERNAL_ERROR_WINDOW: Final = 3600.0


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


class RecentErrors:
    """Whether the internal-error count rose within :data:`INTERNAL_ERROR_WINDOW`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen = 0
        self._rose_at: float | None = None

    def recent(self, count: int) -> bool:
        now = self._clock()
        if count > self._seen:
            self._seen = count
            self._rose_at = now
        return self._rose_at is not None and now - self._rose_at < INTERNAL_ERROR_WINDOW


def smtp_check(
    host: str,
    port: int,
    *,
    proxy_local: bool,
    timeout: float = PROBE_TIMEOUT,
    internal_errors: Callable[[], int] = lambda: 0,
    clock: Callable[[], float] = trio.current_time,
) -> HealthCheck:
    """``smtp``: the submission listener greets with 220; the probe then sends QUIT.

    With ``proxy_local`` (the listener expects PROXY headers) the probe first sends a
    v2 LOCAL header, which tells the listener to keep the socket's own peer address;
    the probe's address must then be in ``Smtp:ProxyProtocol:TrustedNetworks``.
    Descriptions are the original's, which name the port.

    ``internal_errors`` counts bugs caught while serving mail (each answered 451, its
    traceback logged). Once any were counted, ``data`` holds ``internalErrors``; for
    :data:`INTERNAL_ERROR_WINDOW` after the count last rose a greeting server is
    Degraded, not Healthy: the host stays in rotation (mail is kept by the senders),
    but the bug is seen rather than retried silently. With none, the check is the
    original's, byte for byte.
    """
    errors = RecentErrors(clock)

    async def probe() -> CheckResult:
        result = await greet(host, port, proxy_local, timeout)
        count = internal_errors()
        if count == 0:
            return result
        data = {"internalErrors": count}
        if result.status == "Healthy" and errors.recent(count):
            text = f"{result.description}; {count} internal errors, see the log"
            return CheckResult(status="Degraded", description=text, data=data)
        return attrs.evolve(result, data=data)

    return HealthCheck(name="smtp", tags=("protocol",), probe=probe, timeout=timeout + 1)


async def greet(host: str, port: int, proxy_local: bool, limit: float) -> CheckResult:
    """The original's probe: a 220 greeting within ``limit`` seconds, then QUIT."""
    try:
        with trio.fail_after(limit):
            unexpected = await _greet_and_quit(host, port, proxy_local)
    except trio.TooSlowError:
        return _smtp_not_responding(port, f"No SMTP greeting within {limit:g} s")
    except (OSError, trio.BrokenResourceError, _SmtpProbeFailed) as exc:
        return _smtp_not_responding(port, error_message(exc))
    if unexpected is not None:
        text = f"SMTP server on port {port} returned unexpected greeting: {unexpected}"
        return CheckResult(status="Unhealthy", description=text)
    text = f"SMTP server accepting connections on port {port}"
    return CheckResult(status="Healthy", description=text)


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
            return _mx_failed(error_message(exc))
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
