"""The asyncio side of the PostgreSQL store, behind plain Trio calls.

asyncpg is an asyncio library; the server is Trio. :func:`open_bridge` runs one
trio-asyncio loop for the store's lifetime (or joins the one already open in this task,
so the loop is never doubled) and the connection pool in it; :meth:`Bridge.call` hops
into that loop for one piece of database work and back. No other module imports
asyncio or trio-asyncio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import asyncpg
import trio
import trio_asyncio

from relate_smtp.storage.connstring import PostgresParams
from relate_smtp.storage.errors import StoreUnavailable
from relate_smtp.storage.groupcommit import describe
from relate_smtp.storage.postgres.errors import as_store_error
from relate_smtp.storage.postgres.pool import create_pool

__all__ = ["Bridge", "open_bridge"]

T = TypeVar("T")

log = logging.getLogger("relate_smtp.storage.postgres")

CLOSE_TIMEOUT: Final = 5.0  # graceful pool close before connections are cut


class Bridge:
    """The store's loop and pool; made by :func:`open_bridge`."""

    def __init__(
        self, params: PostgresParams, *, loop: asyncio.AbstractEventLoop, pool: asyncpg.Pool
    ) -> None:
        self._loop = loop
        self.pool = pool
        self._acquire_timeout = params.connect_timeout
        self.closed = False

    async def call(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None = None
    ) -> T:
        """Run ``op`` on a pooled connection in the loop, failures mapped to store errors.

        ``budget`` (seconds) bounds the whole call: acquiring, connecting and querying.
        """
        if self.closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        result: T = await trio_asyncio.aio_as_trio(self._with_connection, loop=self._loop)(
            op, budget
        )
        return result

    async def _with_connection(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None
    ) -> T:
        try:
            async with (
                asyncio.timeout(budget),
                self.pool.acquire(timeout=self._acquire_timeout) as con,
            ):
                return await op(con)
        except Exception as exc:
            mapped = as_store_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def close(self) -> None:
        """Close the pool: CLOSE_TIMEOUT for connections in use, then cut them."""
        if self.closed:
            return
        self.closed = True

        async def close() -> None:
            try:
                await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()

        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(close, loop=self._loop)()


@asynccontextmanager
async def open_bridge(params: PostgresParams) -> AsyncIterator[Bridge]:
    """The loop (this task's, or a new one) and a pool created without connecting:
    the server starts while PostgreSQL is down and the pool connects on demand."""
    existing = trio_asyncio.current_loop.get()
    if existing is not None:
        async with _bridge_on(existing, params) as bridge:
            yield bridge
        return
    async with trio_asyncio.open_loop() as loop, _bridge_on(loop, params) as bridge:
        yield bridge


@asynccontextmanager
async def _bridge_on(
    loop: asyncio.AbstractEventLoop, params: PostgresParams
) -> AsyncIterator[Bridge]:
    async def create() -> asyncpg.Pool:
        pool = create_pool(params)
        await pool  # init_size=0: sets up the slots, opens no connection
        return pool

    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_log_loop_error)
    try:
        pool = await trio_asyncio.aio_as_trio(create, loop=loop)()
        bridge = Bridge(params, loop=loop, pool=pool)
        try:
            yield bridge
        finally:
            await bridge.close()
    finally:
        loop.set_exception_handler(previous_handler)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what asyncio reports about orphaned futures and tasks instead of raising it.

    trio-asyncio's default handler re-raises such reports inside the loop's nursery,
    which would end the loop and with it the server. asyncpg leaves some behind when a
    connection dies during its TLS negotiation or while being reset for the pool — the
    very outages the store must outlive — and the call that suffered it has already
    raised :class:`StoreUnavailable`.
    """
    exc = context.get("exception")
    log.warning(
        "PostgreSQL driver: %s%s",
        context.get("message") or "unhandled error",
        f" ({describe(exc)})" if exc is not None else "",
    )
