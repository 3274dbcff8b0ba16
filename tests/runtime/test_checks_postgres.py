"""The ``connection-pool`` health check against a real PostgreSQL server (SPEC §7)."""

from __future__ import annotations

import attrs
import pytest
import trio

from relate_smtp.runtime.checks import connection_pool_check
from relate_smtp.storage.postgres import open_postgres_store
from tests.storage.pg_support import postgres_available, temporary_database

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures(postgres_available.__name__)]

POOL_SIZE = 21
BUSY = POOL_SIZE - 1  # 95.2 % of the pool: what a process-pool check calls exhaustion


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


async def test_a_failing_query_is_unhealthy() -> None:
    async with temporary_database() as db:
        params = attrs.evolve(db.params, port=1, connect_timeout=1)
        async with open_postgres_store(params) as store:
            result = await connection_pool_check(store).run()
    assert result.status == "Unhealthy"
    assert result.description == "Failed to query connection pool statistics"
    assert result.exception
