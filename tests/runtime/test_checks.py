"""The health checks: each state of each check, crashes and overruns, concurrency."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from functools import partial
from typing import cast

import attrs
import pytest
import trio
import trio.testing

from relate_smtp.runtime.checks import (
    GIB,
    MIB,
    CheckResult,
    DiskUsage,
    HealthCheck,
    HealthStatus,
    certificate_check,
    connection_pool_check,
    database_check,
    disk_space_check,
    grade_disk,
    memory_check,
    run_checks,
)
from relate_smtp.runtime.network_checks import dns_mx_check, smtp_check
from relate_smtp.runtime.proxy import LOCAL_V2_HEADER
from relate_smtp.storage import PoolStats, ServerConnections, Store, StoreUnavailable


class FakeStore:
    """Only what the checks use: ``ping`` and ``pool_stats``."""

    def __init__(
        self,
        *,
        ping_error: Exception | None = None,
        hang: bool = False,
        pool: PoolStats | None = None,
    ) -> None:
        self.ping_error = ping_error
        self.hang = hang
        self.pool = pool or PoolStats(active=1, maximum=10)

    async def ping(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if self.ping_error is not None:
            raise self.ping_error

    def pool_stats(self) -> PoolStats:
        return self.pool


def as_store(fake: FakeStore) -> Store:
    return cast(Store, fake)


# ---------------------------------------------------------------------------- database


async def test_database_healthy() -> None:
    check = database_check(as_store(FakeStore()))
    assert (check.name, check.tags) == ("database", ("infrastructure",))
    result = await check.run()
    assert result == CheckResult(status="Healthy")  # the original's: no description


async def test_database_failure_is_unhealthy_with_the_message() -> None:
    store = FakeStore(ping_error=StoreUnavailable("could not connect to server: refused"))
    result = await database_check(as_store(store)).run()
    assert result.status == "Unhealthy"
    assert result.exception == "could not connect to server: refused"


async def test_database_that_does_not_answer_is_unhealthy_after_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    result = await database_check(as_store(FakeStore(hang=True))).run()
    assert result.status == "Unhealthy"
    assert result.exception is not None and "within 5 s" in result.exception
    assert trio.current_time() - start == pytest.approx(5)


# ---------------------------------------------------------------------------- pool


class ServerStore(FakeStore):
    """A store in front of a database server: the counts the server reports."""

    def __init__(self, counts: ServerConnections | Exception) -> None:
        super().__init__(pool=PoolStats(active=10, maximum=10))  # a busy pool is no signal
        self.counts = counts

    async def server_connections(self) -> ServerConnections:
        await trio.lowlevel.checkpoint()
        if isinstance(self.counts, Exception):
            raise self.counts
        return self.counts


@pytest.mark.parametrize(
    ("active", "status", "prefix"),
    [(50, "Healthy", ""), (80, "Healthy", ""), (81, "Degraded", "Connection pool pressure: "),
     (95, "Degraded", "Connection pool pressure: "),
     (96, "Unhealthy", "Connection pool near exhaustion: ")],
)  # fmt: skip
async def test_connection_pool_counts_the_servers_connections(
    active: int, status: HealthStatus, prefix: str
) -> None:
    store = ServerStore(ServerConnections(active=active, maximum=100))
    check = connection_pool_check(as_store(store))
    assert (check.name, check.tags) == ("connection-pool", ("database",))
    result = await check.run()
    assert result.status == status
    assert result.description == f"{prefix}{active}/100 connections ({active:.1f}%)"
    assert result.data == {
        "activeConnections": active,
        "maxConnections": 100,
        "usedPercent": float(active),
    }


async def test_connection_pool_query_failure_is_unhealthy() -> None:
    store = ServerStore(StoreUnavailable("connection refused"))
    result = await connection_pool_check(as_store(store)).run()
    assert result.status == "Unhealthy"
    assert result.description == "Failed to query connection pool statistics"
    assert result.exception == "connection refused"


async def test_connection_pool_without_a_maximum_is_healthy() -> None:
    store = ServerStore(ServerConnections(active=3, maximum=0))
    result = await connection_pool_check(as_store(store)).run()
    assert result.status == "Healthy"
    assert result.data is not None and result.data["usedPercent"] == 0.0


async def test_connection_pool_of_the_embedded_store_is_healthy() -> None:
    store = FakeStore(pool=PoolStats(active=10, maximum=10))
    result = await connection_pool_check(as_store(store)).run()
    assert result.status == "Healthy"
    assert result.data == {"backend": "sqlite"}


# ---------------------------------------------------------------------------- disk


@pytest.mark.parametrize(
    ("free", "status"),
    [(5 * GIB, "Healthy"), (1 * GIB, "Healthy"), (1 * GIB - 1, "Degraded"),
     (100 * MIB, "Degraded"), (100 * MIB - 1, "Unhealthy"), (0, "Unhealthy")],
)  # fmt: skip
async def test_disk_space(free: int, status: HealthStatus) -> None:
    seen: list[str] = []

    def usage(path: str) -> DiskUsage:
        seen.append(path)
        return DiskUsage(total=10 * GIB, used=10 * GIB - free, free=free)

    check = disk_space_check("/data/relate-smtp.db", usage=usage)
    assert (check.name, check.tags) == ("disk-space", ("system",))
    result = await check.run()
    assert seen == ["/data/relate-smtp.db"]
    assert result.status == status
    assert result.data == {
        "availableGB": free / GIB,
        "totalGB": 10.0,
        "usedPercent": 100 * (10 * GIB - free) / (10 * GIB),
    }


@pytest.mark.parametrize(
    ("free", "description"),
    [(5 * GIB, "5.00 GB available (50.0% used)"),
     (512 * MIB, "Disk space low: 0.50 GB available (95.0% used)"),
     (50 * MIB, "Disk space critically low: 50 MB available (99.5% used)")],
)  # fmt: skip
def test_disk_space_words_it_as_the_original(free: int, description: str) -> None:
    disk = DiskUsage(total=10 * GIB, used=10 * GIB - free, free=free)
    assert grade_disk(disk).description == description


async def test_disk_space_of_a_file_not_yet_created_measures_its_disk(
    tmp_path: pytest.TempPathFactory,
) -> None:
    result = await disk_space_check(f"{tmp_path}/not/yet/there.db").run()
    assert result.status in ("Healthy", "Degraded", "Unhealthy")
    assert result.exception is None
    assert result.data is not None
    assert all(isinstance(result.data[k], float) for k in ("availableGB", "totalGB", "usedPercent"))


# ---------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("rss", "status"),
    [(200 * MIB, "Healthy"), (1_500_000_000 - 1, "Healthy"), (1_500_000_000, "Degraded"),
     (1_900_000_000 - 1, "Degraded"), (1_900_000_000, "Unhealthy"),
     (int(1.5 * GIB) - 1, "Degraded"), (int(1.9 * GIB) - 1, "Unhealthy")],
)  # fmt: skip
async def test_memory_thresholds_are_the_originals_decimal_bytes(
    rss: int, status: HealthStatus
) -> None:
    check = memory_check(rss=lambda: rss)
    assert (check.name, check.tags) == ("memory", ("system",))
    result = await check.run()
    assert result.status == status
    assert result.data == {"workingSetMB": rss / MIB}


@pytest.mark.parametrize(
    ("rss", "description"),
    [(200 * MIB, "Working set 200 MB"),
     (1600 * MIB, "Working set 1600 MB exceeds 1431 MB threshold"),
     (2000 * MIB, "Working set 2000 MB exceeds 1812 MB threshold")],
)  # fmt: skip
async def test_memory_words_it_as_the_original(rss: int, description: str) -> None:
    assert (await memory_check(rss=lambda: rss).run()).description == description


async def test_memory_reads_this_process() -> None:
    result = await memory_check().run()
    assert result.data is not None
    used = result.data["workingSetMB"]
    assert isinstance(used, float) and 1 < used < 100_000


# ---------------------------------------------------------------------------- certificate


@attrs.frozen
class CertificateStatus:
    """Shaped like the TLS module's verdict."""

    status: HealthStatus
    description: str
    data: Mapping[str, str | float] | None = None


async def test_certificate_check_passes_the_verdict_through() -> None:
    data: dict[str, str | float] = {
        "subject": "CN=mail.example.com",
        "daysUntilExpiry": 12.5,
        "thumbprint": "AB",
    }
    check = certificate_check(lambda: CertificateStatus("Degraded", "expires in 12 days", data))
    assert (check.name, check.tags) == ("certificate", ("tls",))
    assert await check.run() == CheckResult(
        status="Degraded", description="expires in 12 days", data=data
    )


async def test_certificate_check_accepts_a_check_result() -> None:
    result = CheckResult(status="Healthy", description="No certificate configured")
    assert await certificate_check(lambda: result).run() == result


# ---------------------------------------------------------------------------- dns


async def test_dns_mx_with_records_is_healthy() -> None:
    asked: list[str] = []

    async def resolve(domain: str) -> list[str]:
        asked.append(domain)
        return ["alt1.gmail-smtp-in.l.google.com.", "gmail-smtp-in.l.google.com."]

    check = dns_mx_check("gmail.com", resolve=resolve)
    assert (check.name, check.tags) == ("dns-mx", ("smtp",))
    result = await check.run()
    assert asked == ["gmail.com"]
    assert result.status == "Healthy"
    assert result.data == {"testDomain": "gmail.com", "mxRecordCount": 2}
    assert result.description == (
        "DNS MX resolution working "
        "(gmail.com → alt1.gmail-smtp-in.l.google.com, gmail-smtp-in.l.google.com)"
    )


async def test_dns_mx_names_the_first_three_exchanges() -> None:
    async def resolve(domain: str) -> list[str]:
        return ["a.example.", "b.example.", "c.example.", "d.example."]

    result = await dns_mx_check("example.com", resolve=resolve).run()
    assert result.description == (
        "DNS MX resolution working (example.com → a.example, b.example, c.example)"
    )
    assert result.data == {"testDomain": "example.com", "mxRecordCount": 4}


async def test_dns_mx_without_records_is_degraded() -> None:
    async def resolve(domain: str) -> list[str]:
        return []

    result = await dns_mx_check("example.invalid", resolve=resolve).run()
    assert result.status == "Degraded"
    assert result.exception is None
    assert result.description == "No MX records returned for example.invalid"
    assert result.data == {"testDomain": "example.invalid", "mxRecordCount": 0}


async def test_dns_mx_failure_is_degraded_not_unhealthy() -> None:
    async def resolve(domain: str) -> list[str]:
        raise OSError("no nameservers reachable")

    result = await dns_mx_check("gmail.com", resolve=resolve).run()
    assert result.status == "Degraded"
    assert result.exception == "no nameservers reachable"
    assert result.description == "DNS MX resolution failed"


async def test_dns_mx_that_hangs_is_degraded(autojump_clock: trio.testing.MockClock) -> None:
    async def resolve(domain: str) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError

    result = await dns_mx_check("gmail.com", resolve=resolve, timeout=2).run()
    assert result.status == "Degraded"
    assert result.exception is not None and "within 2 s" in result.exception


# ---------------------------------------------------------------------------- smtp


class FakeSmtpServer:
    """Greets, answers QUIT, and records every byte it receives."""

    def __init__(
        self,
        greeting: bytes = b"220-mx.example ESMTP\r\n220 ready\r\n",
        *,
        expect_proxy: bool = False,
    ) -> None:
        self.greeting = greeting
        self.expect_proxy = expect_proxy
        self.received = b""
        self.done = trio.Event()

    async def _receive_until(self, stream: trio.SocketStream, size: int) -> bool:
        while len(self.received) < size:
            chunk = await stream.receive_some()
            if not chunk:
                return False
            self.received += chunk
        return True

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            # Like a PROXY listener: the header comes before the greeting is sent.
            proxy_size = len(LOCAL_V2_HEADER) if self.expect_proxy else 0
            if await self._receive_until(stream, proxy_size):
                if self.greeting:
                    await stream.send_all(self.greeting)
                if await self._receive_until(stream, proxy_size + len(b"QUIT\r\n")):
                    await stream.send_all(b"221 2.0.0 Bye\r\n")
        self.done.set()


async def serve(nursery: trio.Nursery, handler: FakeSmtpServer) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler.handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_smtp_healthy_without_proxy(nursery: trio.Nursery) -> None:
    server = FakeSmtpServer()
    port = await serve(nursery, server)
    check = smtp_check("127.0.0.1", port, proxy_local=False)
    assert (check.name, check.tags) == ("smtp", ("protocol",))
    result = await check.run()
    await server.done.wait()
    assert result.status == "Healthy", result
    assert result.description == f"SMTP server accepting connections on port {port}"
    assert server.received == b"QUIT\r\n"


async def test_smtp_does_not_require_the_221(nursery: trio.Nursery) -> None:
    async def greet_only(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 ready\r\n")
            await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, greet_only, 0, host="127.0.0.1"))
    port = int(listeners[0].socket.getsockname()[1])
    result = await smtp_check("127.0.0.1", port, proxy_local=False, timeout=3).run()
    assert result.status == "Healthy", result


async def test_smtp_healthy_with_proxy_local_header(nursery: trio.Nursery) -> None:
    server = FakeSmtpServer(expect_proxy=True)
    port = await serve(nursery, server)
    result = await smtp_check("127.0.0.1", port, proxy_local=True).run()
    await server.done.wait()
    assert result.status == "Healthy", result
    assert server.received == b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20" + b"\x00" + b"\x00\x00" + (
        b"QUIT\r\n"
    )


async def test_smtp_refusing_greeting_is_unhealthy(nursery: trio.Nursery) -> None:
    port = await serve(nursery, FakeSmtpServer(b"554 5.3.2 not now\r\n"))
    result = await smtp_check("127.0.0.1", port, proxy_local=False).run()
    assert result.status == "Unhealthy"
    assert result.description == (
        f"SMTP server on port {port} returned unexpected greeting: 554 5.3.2 not now"
    )


async def test_smtp_non_smtp_answer_is_unhealthy(nursery: trio.Nursery) -> None:
    port = await serve(nursery, FakeSmtpServer(b"HTTP/1.1 400 Bad Request\r\n"))
    result = await smtp_check("127.0.0.1", port, proxy_local=False).run()
    assert result.status == "Unhealthy"
    assert result.exception is not None and "not an SMTP reply" in result.exception


async def test_smtp_connection_refused_is_unhealthy() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await smtp_check("127.0.0.1", port, proxy_local=False).run()
    assert result.status == "Unhealthy"
    assert result.exception
    assert result.description == f"SMTP server on port {port} is not responding"


async def test_smtp_silent_server_is_unhealthy_after_the_timeout(nursery: trio.Nursery) -> None:
    silent = FakeSmtpServer(greeting=b"")
    port = await serve(nursery, silent)
    result = await smtp_check("127.0.0.1", port, proxy_local=False, timeout=0.3).run()
    assert result.status == "Unhealthy"
    assert result.exception is not None and "within 0.3 s" in result.exception


# ---------------------------------------------------------------------------- running


async def test_a_crashing_check_is_unhealthy_with_its_message() -> None:
    async def boom() -> CheckResult:
        raise RuntimeError("probe exploded")

    result = await HealthCheck(name="x", tags=(), probe=boom).run()
    assert result == CheckResult(
        status="Unhealthy", description="probe exploded", exception="probe exploded"
    )


async def test_a_check_past_its_timeout_is_unhealthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow() -> CheckResult:
        await trio.sleep(60)
        return CheckResult(status="Healthy")

    result = await HealthCheck(name="x", tags=(), probe=slow, timeout=3).run()
    assert result.status == "Unhealthy"
    assert result.exception == "The check did not complete within 3 s"
    assert trio.current_time() == pytest.approx(3)


async def test_checks_run_concurrently_and_the_worst_wins() -> None:
    a_started, b_started = trio.Event(), trio.Event()

    async def a() -> CheckResult:
        a_started.set()
        await b_started.wait()  # would deadlock (then time out) if run one after the other
        return CheckResult(status="Degraded")

    async def b() -> CheckResult:
        b_started.set()
        await a_started.wait()
        return CheckResult(status="Healthy")

    with trio.fail_after(5):
        report = await run_checks(
            [HealthCheck(name="a", tags=(), probe=a), HealthCheck(name="b", tags=(), probe=b)]
        )
    assert [o.check.name for o in report.outcomes] == ["a", "b"]
    assert [o.result.status for o in report.outcomes] == ["Degraded", "Healthy"]
    assert report.status == "Degraded"


async def test_no_checks_is_healthy() -> None:
    report = await run_checks([])
    assert report.status == "Healthy"
    assert report.outcomes == ()
