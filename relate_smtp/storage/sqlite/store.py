"""The embedded SQLite store, so that ``relate-smtp serve`` runs with no database server.

sqlite3 blocks, so every call runs in a worker thread (``trio.to_thread.run_sync``)
bounded by a :class:`trio.CapacityLimiter`. Each of those threads borrows a connection
from a small pool and gives it back (``check_same_thread=False``, because Trio reuses
worker threads freely but never shares a connection between two at once). A pool
rather than one locked connection lets address and key lookups read in parallel with a
commit, which WAL allows.

Writes are serialised in this process by a Trio lock, so our own connections never
meet SQLite's sleep-and-retry busy handler; several server processes sharing the file
are serialised by SQLite's lock and wait up to ``busy_timeout`` for each other.
:meth:`SqliteStore.save_email` goes through the shared group commit
(:mod:`relate_smtp.storage.groupcommit`), whose batches :mod:`.saving` writes.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, TypeVar

import trio

from relate_smtp.storage import PoolStats
from relate_smtp.storage.accounts import AccountWrites, NewUser
from relate_smtp.storage.errors import StoreUnavailable
from relate_smtp.storage.groupcommit import DEFAULT_MAX_BATCH, GroupCommit, Outcome
from relate_smtp.storage.records import (
    ApiKey,
    NewEmail,
    SavedEmail,
    StoredEmail,
    User,
)
from relate_smtp.storage.sqlite import connection, queries, saving
from relate_smtp.storage.values import normalise_email

__all__ = ["DEFAULT_MAX_THREADS", "SqliteStore"]

T = TypeVar("T")

DEFAULT_MAX_THREADS: Final = 8
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
CLOSE_GRACE: Final = 5.0  # seconds the batch in flight gets when the store closes


class SqliteStore(AccountWrites):
    """:class:`~relate_smtp.storage.AdminStore` on a SQLite file.

    Build it with ``await SqliteStore.open(path)``, which also creates the tables; the
    constructor does no I/O. A relative ``path`` is taken relative to the current
    directory at construction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_threads: int = DEFAULT_MAX_THREADS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._busy_timeout_ms = busy_timeout_ms
        self._limiter = trio.CapacityLimiter(max_threads)
        self._write_lock = trio.Lock()
        self._commit = GroupCommit(self._write_batch, name="SQLite", max_batch=max_batch)
        # Touched from worker threads, hence a thread lock rather than a Trio one.
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_threads: int = DEFAULT_MAX_THREADS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> SqliteStore:
        """Open (creating if need be) the database file and its tables."""
        store = cls(
            path, max_threads=max_threads, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch
        )
        try:
            await store.init_schema()
            await trio.to_thread.run_sync(connection.warn_if_exposed, store.path)
        except BaseException:
            await store.aclose()
            raise
        return store

    async def init_schema(self) -> None:
        """Create the missing tables and indexes; existing ones are left as they are."""

        def work(conn: sqlite3.Connection) -> None:
            # One script in one transaction, so that two processes starting together
            # never see half a schema.
            conn.executescript(f"BEGIN IMMEDIATE;\n{connection.schema_sql()}\nCOMMIT;")

        async with self._write_lock:
            await self._run(work)

    async def check_schema(self) -> None:
        """Nothing to check: :meth:`open` creates the embedded store's tables itself."""

    # --- Store ---------------------------------------------------------------------

    async def find_user_by_address(self, address: str) -> User | None:
        def work(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(queries.FIND_USER, (queries.ascii_lower(address),)).fetchone()
            if row is None:
                return None
            return User(id=uuid.UUID(row[0]), email=row[1], display_name=row[2])

        return await self._run(work)

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        def work(conn: sqlite3.Connection) -> tuple[str, ...]:
            rows = conn.execute(queries.USER_ADDRESSES, (str(user_id),))
            return tuple(dict.fromkeys(address.lower() for address, _rank in rows))

        return await self._run(work)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(queries.CANDIDATE_KEYS, (str(user_id), prefix))
            return [queries.api_key_record(row) for row in rows]

        return await self._run(work)

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        if not last_used:
            return
        params = [(queries.ts(when), str(key_id)) for key_id, when in last_used.items()]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(queries.TOUCH_KEY, params)

        await self._write(work)

    async def save_email(self, email: NewEmail) -> SavedEmail:
        """Store the message through the group commit; return once it is committed."""
        email = normalise_email(email)
        return await self._commit.submit(email, size=email.size_bytes)

    async def _write_batch(self, emails: Sequence[NewEmail]) -> list[Outcome]:
        async with self._write_lock:
            return await self._run(functools.partial(saving.save_batch, emails=emails))

    async def ping(self) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute('SELECT 1 FROM "Users" LIMIT 1').fetchall()

        await self._run(work)

    def pool_stats(self) -> PoolStats:
        return PoolStats(
            active=int(self._limiter.borrowed_tokens), maximum=int(self._limiter.total_tokens)
        )

    async def aclose(self) -> None:
        """Fail queued saves and let the batch in flight finish; close idle connections
        now, busy ones when their call returns."""
        await self._commit.aclose(CLOSE_GRACE)
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []

        def close_all() -> None:
            for conn in idle:
                conn.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_all)

    # --- AdminStore ----------------------------------------------------------------

    async def _insert_user(self, new: NewUser) -> None:
        await self._write(functools.partial(queries.create_user, new=new))

    async def _insert_api_key(self, key: ApiKey) -> None:
        await self._write(functools.partial(queries.create_api_key, key=key))

    async def list_api_keys(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(queries.KEYS_OF_USER, (str(user_id),))
            return [queries.api_key_record(row) for row in rows]

        return await self._run(work)

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        now = queries.ts(datetime.now(UTC))

        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(queries.REVOKE_KEY, (now, str(key_id))).rowcount > 0

        return await self._write(work)

    async def list_emails(self, limit: int = 50) -> Sequence[StoredEmail]:
        """Most recent first, with recipients but without attachments."""
        return await self._run(
            functools.partial(
                connection.in_read_transaction, functools.partial(queries.list_emails, limit=limit)
            )
        )

    async def get_email(self, email_id: uuid.UUID) -> StoredEmail | None:
        return await self._run(
            functools.partial(
                connection.in_read_transaction,
                functools.partial(queries.get_email, email_id=str(email_id)),
            )
        )

    # --- plumbing ------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._write_lock:
            return await self._run(functools.partial(connection.in_write_transaction, work))

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        return await trio.to_thread.run_sync(self._call, work, limiter=self._limiter)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """In a worker thread: borrow a connection, run ``work``, give it back."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._checkout()
            return work(conn)
        except sqlite3.Error as exc:
            raise connection.store_error(exc) from exc
        finally:
            if conn is not None:
                self._checkin(conn)

    def _checkout(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable("the SQLite store is closed")
            if self._idle:
                return self._idle.pop()
        return connection.connect(self.path, self._busy_timeout_ms)

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed and not conn.in_transaction:
                self._idle.append(conn)
                return
        conn.close()
