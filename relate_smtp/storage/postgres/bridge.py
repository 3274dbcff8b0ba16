"""The asyncio side of the PostgreSQL store, behind plain Trio calls.

asyncpg is an asyncio library; the server is Trio. :func:`open_bridge` runs a plain
asyncio loop in a thread of its own for the store's lifetime, and the connection pool
in it; :meth:`Bridge.call` hands one piece of database work to that loop and waits for
it without blocking Trio. A thread rather than trio-asyncio's loop emulated inside Trio:
each asyncio callback there is a trip through Trio's scheduler (a channel receive and
a cancel scope), which made a call cost about 170 µs before any I/O, and every
readiness event of asyncpg's socket as much again; the handoff to a real loop costs a
third of that, and asyncpg runs at its native speed. The database work is a small
share of the CPU, so the two threads rarely want the interpreter at the same time.
No other module imports asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, TypeVar

import asyncpg
import outcome
import trio

from relate_smtp.storage.connstring import PostgresParams
from relate_smtp.storage.errors import StoreUnavailable
from relate_smtp.storage.groupcommit import describe
from relate_smtp.storage.postgres.errors import as_store_error
from relate_smtp.storage.postgres.pool import create_pool

__all__ = ["Bridge", "open_bridge"]

T = TypeVar("T")

log = logging.getLogger("relate_smtp.storage.postgres")

CLOSE_TIMEOUT: Final = 5.0  # graceful pool close before connections are cut


class _LoopThread:
    """An asyncio loop running in its own thread until :meth:`stop`."""

    def __init__(self) -> None:
        # A loop of its own, not the policy's: this thread never runs Trio's.
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self.loop.set_exception_handler(_log_loop_error)
        self._thread = threading.Thread(target=self._run, name="relate-smtp-postgres", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        try:
            loop.run_forever()
            left = asyncio.all_tasks(loop)
            if left:
                loop.run_until_complete(_cancel_all(left))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in the loop; a Trio cancellation cancels it there and returns
        once it has finished (a connection in use is back in the pool by then)."""
        token = trio.lowlevel.current_trio_token()
        waiter = trio.lowlevel.current_task()
        started: list[asyncio.Task[None]] = []

        async def relay() -> None:
            # The outcome travels with the wake-up itself: a done callback would cost
            # the loop another turn (and the task's result a lookup on the Trio side).
            result: outcome.Outcome[T] | None
            try:
                result = outcome.Value(await coro)
            except asyncio.CancelledError:
                result = None
            except GeneratorExit:  # the coroutine closed unfinished: nothing to report
                raise
            except BaseException as exc:  # re-raised in the Trio task
                result = outcome.Error(exc)
            token.run_sync_soon(trio.lowlevel.reschedule, waiter, outcome.Value(result))

        def start() -> None:
            started.append(self.loop.create_task(relay()))

        def cancel() -> None:
            if started:
                started[0].cancel()

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise StoreUnavailable("the PostgreSQL store is closed") from None
        cancelled: list[Callable[[], object]] = []

        def abort(raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
            cancelled.append(raise_cancel)
            self.loop.call_soon_threadsafe(cancel)
            return trio.lowlevel.Abort.FAILED

        result: outcome.Outcome[T] | None = await trio.lowlevel.wait_task_rescheduled(abort)
        if result is None:  # cancelled in the loop: by the Trio task, or the loop's end
            if cancelled:
                cancelled[0]()
            raise StoreUnavailable("the PostgreSQL store is closed")
        return result.unwrap()

    async def stop(self) -> None:
        """Stop the loop (tasks still in it are cancelled) and wait for the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        await trio.to_thread.run_sync(self._thread.join)


async def _cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Bridge:
    """The store's loop and pool; made by :func:`open_bridge`."""

    def __init__(self, params: PostgresParams, *, loop: _LoopThread, pool: asyncpg.Pool) -> None:
        self._loop = loop
        self.pool = pool
        self._acquire_timeout = params.connect_timeout
        self._idle_lifetime = params.idle_lifetime
        self.closed = False
        # The group commit's connection (``call_held``), and when it goes back to the
        # pool if unused.
        self._held: asyncpg.pool.PoolConnectionProxy | None = None
        self._held_release: asyncio.TimerHandle | None = None
        self._held_used_at = 0.0  # the loop's clock
        self._releasing: set[asyncio.Task[None]] = set()
        self._held_busy = False

    async def call(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None = None
    ) -> T:
        """Run ``op`` on a pooled connection in the loop, failures mapped to store errors.

        ``budget`` (seconds) bounds the whole call: acquiring, connecting and querying.
        """
        if self.closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        return await self._loop.run(self._with_connection(op, budget))

    async def call_held(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None = None
    ) -> T:
        """``call`` on a connection kept between calls, for a caller that makes one call
        at a time (the group commit's leader): no pool acquire and release per batch,
        which cost about as much as the crossing itself. The connection goes back to
        the pool after a failure, and after Connection Idle Lifetime unused."""
        if self.closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        return await self._loop.run(self._with_held_connection(op, budget))

    async def _with_held_connection(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None
    ) -> T:
        try:
            async with _timeout(budget):
                con = self._held
                if con is None or con.is_closed():
                    await self._release_held()
                    con = self._held = await self.pool.acquire(timeout=self._acquire_timeout)
                self._held_busy = True
                result = await op(con)
                self._held_busy = False
        except BaseException as exc:
            self._held_busy = False
            await self._release_held()  # a broken or cancelled connection is not kept
            if isinstance(exc, Exception):
                _raise_as_store_error(exc)
            raise
        if self._idle_lifetime > 0:
            loop = asyncio.get_running_loop()
            self._held_used_at = loop.time()
            if self._held_release is None:  # one timer, moved on when it fires
                self._held_release = loop.call_later(self._idle_lifetime, self._release_if_idle)
        return result

    @property
    def held_idle(self) -> int:
        """1 while the kept connection waits for the next call (idle, though not in the
        pool), else 0."""
        return int(self._held is not None and not self._held_busy)

    def _release_if_idle(self) -> None:
        """Connection Idle Lifetime after the last batch (not after the first since the
        timer was set): the kept connection goes back to the pool."""
        loop = asyncio.get_running_loop()
        unused_for = loop.time() - self._held_used_at
        if self._held_busy or unused_for < self._idle_lifetime:
            wait = self._idle_lifetime if self._held_busy else self._idle_lifetime - unused_for
            self._held_release = loop.call_later(wait, self._release_if_idle)
            return
        self._held_release = None
        task = loop.create_task(self._release_held())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_held(self) -> None:
        con, self._held = self._held, None
        if con is not None:
            with contextlib.suppress(Exception):
                await self.pool.release(con)

    async def _with_connection(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None
    ) -> T:
        try:
            async with (
                _timeout(budget),
                self.pool.acquire(timeout=self._acquire_timeout) as con,
            ):
                return await op(con)
        except Exception as exc:
            _raise_as_store_error(exc)

    async def close(self) -> None:
        """Close the pool: CLOSE_TIMEOUT for connections in use, then cut them."""
        if self.closed:
            return
        self.closed = True

        async def close() -> None:
            if self._held_release is not None:
                self._held_release.cancel()
            await self._release_held()
            try:
                await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()

        with trio.CancelScope(shield=True):
            await self._loop.run(close())


@asynccontextmanager
async def open_bridge(params: PostgresParams) -> AsyncIterator[Bridge]:
    """The loop's thread and a pool created without connecting: the server starts
    while PostgreSQL is down and the pool connects on demand."""

    async def create() -> asyncpg.Pool:
        pool = create_pool(params)
        await pool  # init_size=0: sets up the slots, opens no connection
        return pool

    loop = _LoopThread()
    try:
        pool = await loop.run(create())
        bridge = Bridge(params, loop=loop, pool=pool)
        try:
            yield bridge
        finally:
            await bridge.close()
    finally:
        with trio.CancelScope(shield=True):
            await loop.stop()


def _timeout(budget: float | None) -> contextlib.AbstractAsyncContextManager[object]:
    """``asyncio.timeout(budget)``, or nothing to set up when there is no budget."""
    return asyncio.timeout(budget) if budget is not None else contextlib.nullcontext()


def _raise_as_store_error(exc: Exception) -> NoReturn:
    """Raise ``exc`` as the store error it means (a lost connection, a refused
    statement, …), or as itself when it is none."""
    mapped = as_store_error(exc)
    if mapped is exc:
        raise exc
    raise mapped from exc


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what asyncio reports about orphaned futures and tasks instead of raising it.

    A report must not end the loop, and with it the store. asyncpg leaves some behind when a
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
