"""The health checks: each state of each check, crashes and overruns, concurrency."""

from __future__ import annotations

from collections.abc import Mapping
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
from relate_smtp.storage import PoolStats, ServerConnections, Store, StoreUnavailable
from relate_smtp.storage.postgres import open_postgres_store
from tests.storage.helpers import temporary_database


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


# ---------------------------------------------------------------------------- pool, on PostgreSQL
# The ``connection-pool`` check against a real PostgreSQL server (SPEC §7).

POOL_SIZE = 21
BUSY = POOL_SIZE - 1  # 95.2 % of the pool: what a process-pool check calls exhaustion


@pytest.mark.postgres
@pytest.mark.usefixtures("postgres_available")
async def test_a_busy_pool_is_healthy_and_the_servers_sessions_are_counted() -> None:
    async with temporary_database() as db:
        params = attrs.evolve(db.params, max_pool_size=POOL_SIZE)
        async with open_postgres_store(params) as store, trio.open_nursery() as nursery:
            async with db.locked("Users", "ACCESS EXCLUSIVE"):
                for _ in range(BUSY):
                    nursery.start_soon(store.find_user_by_address, "alice@example.com")
                await db.sessions_waiting_on_locks(BUSY)
                assert store.pool_stats().active == BUSY
                result = await connection_pool_check(store).run()
            maximum = int(await db.fetchval("SHOW max_connections"))
    assert result.status == "Healthy", result
    assert result.data is not None
    active = result.data["activeConnections"]
    assert isinstance(active, int)
    # The blocked lookups, the lock holder and the check's own session, at least.
    assert active >= BUSY + 2
    assert result.data["maxConnections"] == maximum
    assert result.data["usedPercent"] == pytest.approx(100 * active / maximum)
    assert result.description == f"{active}/{maximum} connections ({100 * active / maximum:.1f}%)"


@pytest.mark.postgres
@pytest.mark.usefixtures("postgres_available")
async def test_a_failing_query_is_unhealthy() -> None:
    async with temporary_database() as db:
        params = attrs.evolve(db.params, port=1, connect_timeout=1)
        async with open_postgres_store(params) as store:
            result = await connection_pool_check(store).run()
    assert result.status == "Unhealthy"
    assert result.description == "Failed to query connection pool statistics"
    assert result.exception
