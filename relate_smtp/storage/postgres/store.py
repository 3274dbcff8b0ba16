"""The PostgreSQL store: the platform's own database, through asyncpg in an
asyncio loop of its own thread (:mod:`.bridge`).

Availability (SPEC §10): the pool is created with no connection opened (asyncpg's
``init_size=0``), so the server starts while PostgreSQL is down. Each call acquires a
connection, and asyncpg reconnects a pool slot whose connection was lost, so the store
recovers by itself when the database returns. Every transient failure (refused or timed
out connection, a connection dropped mid-query, the server shutting down, too many
connections, serialization failure) surfaces as :class:`StoreUnavailable`; anything else
is a bug or a schema mismatch and is not disguised as one (:mod:`.errors`).

Saving goes through the shared group commit (:mod:`relate_smtp.storage.groupcommit`);
each batch is one statement (:mod:`.batch`). If the database refuses a batch for
something one message may have caused, its messages are stored one by one, so a bad
message fails alone; a lost connection fails the whole batch with
:class:`StoreUnavailable` and, the batch being one statement, leaves nothing partial.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Final

import asyncpg
import attrs

from relate_smtp.storage import PoolStats, ServerConnections
from relate_smtp.storage.accounts import CLI_OIDC_ISSUER, AccountWrites, NewUser, refuse_taken
from relate_smtp.storage.connstring import PostgresParams, parse_connection_string
from relate_smtp.storage.errors import StoreError, StoreUnavailable, UserNotFound
from relate_smtp.storage.groupcommit import (
    GroupCommit,
    GroupCommitStats,
    Outcome,
    copy_error,
    describe,
)
from relate_smtp.storage.postgres import batch, queries, schema
from relate_smtp.storage.postgres.bridge import CLOSE_TIMEOUT, Bridge, open_bridge
from relate_smtp.storage.postgres.errors import as_store_error, fails_every_message
from relate_smtp.storage.records import (
    ApiKey,
    NewEmail,
    RecipientRow,
    SavedEmail,
    StoredEmail,
    User,
)
from relate_smtp.storage.values import normalise_email, utc

__all__ = ["PostgresStore", "open_postgres_store"]

log = logging.getLogger("relate_smtp.storage.postgres")

PING_TIMEOUT: Final = 5.0  # SPEC §7: the database health check fails after 5 s


@attrs.define
class _Sent:
    """Whether a batch statement left for the server (so it may have committed)."""

    statement: bool = False


class PostgresStore(AccountWrites):
    """:class:`~relate_smtp.storage.AdminStore` on PostgreSQL.

    Made by :func:`open_postgres_store`, which owns the asyncio loop the methods
    run in; the methods may be called from any Trio task while that context is open.
    """

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._commit = GroupCommit(self._write_batch, name="PostgreSQL")

    # -- Store --

    async def find_user_by_address(self, address: str) -> User | None:
        async def op(con: asyncpg.Connection) -> User | None:
            row = await con.fetchrow(queries.FIND_USER, address)
            if row is None:
                return None
            return User(id=row["Id"], email=row["Email"], display_name=row["DisplayName"])

        return await self._bridge.call(op)

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        async def op(con: asyncpg.Connection) -> tuple[str, ...]:
            rows = await con.fetch(queries.USER_ADDRESSES, user_id)
            return tuple(dict.fromkeys(row["address"] for row in rows))

        return await self._bridge.call(op)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        async def op(con: asyncpg.Connection) -> Sequence[ApiKey]:
            rows = await con.fetch(queries.CANDIDATE_KEYS, user_id, prefix)
            return [queries.api_key(row) for row in rows]

        return await self._bridge.call(op)

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        if not last_used:
            return
        ids = list(last_used)
        times = [utc(last_used[key_id]) for key_id in ids]

        async def op(con: asyncpg.Connection) -> None:
            await con.execute(queries.TOUCH_KEYS, ids, times)

        await self._bridge.call(op)

    async def save_email(self, email: NewEmail) -> SavedEmail:
        """Store the message through the group commit; return once it is committed."""
        email = normalise_email(email)
        return await self._commit.submit(batch.message_rows(email), size=email.size_bytes)

    def group_commit_stats(self) -> GroupCommitStats:
        """Counters of the group commit so far (a snapshot)."""
        return self._commit.stats()

    async def _write_batch(self, rows: Sequence[batch.MessageRows]) -> Sequence[Outcome]:
        sent = _Sent()
        try:
            return await self._bridge.call_held(
                functools.partial(self._save_batch, messages=rows, sent=sent)
            )
        except StoreUnavailable as exc:
            if not sent.statement:
                raise
            return await self._recover_outcomes(rows, exc)

    async def _recover_outcomes(
        self, rows: Sequence[batch.MessageRows], exc: StoreUnavailable
    ) -> Sequence[Outcome]:
        """After a lost connection, ask again which messages of the batch are stored.

        The statement may have committed with only its answer lost; the e-mails' ids
        are known, so a message found stored is reported saved (its sender gets 250
        rather than a 451 that would make it send the message a second time). When the
        database cannot be asked either, the failure stands.
        """
        ids = [message.email_id for message in rows]
        try:
            found = await self._bridge.call(
                functools.partial(batch.find_saved, ids=ids), PING_TIMEOUT
            )
        except StoreError:
            raise exc from None
        if found:
            log.warning(
                "connection lost after PostgreSQL stored %d of %d messages; reporting "
                "those as saved",
                len(found),
                len(rows),
            )
        return [found[i] if i in found else copy_error(exc) for i in ids]

    async def _save_batch(
        self, con: asyncpg.Connection, messages: Sequence[batch.MessageRows], sent: _Sent
    ) -> list[Outcome]:
        """asyncio side: the batch in one statement; when the database refuses it for
        something one message may have caused, each message again on its own, so a bad
        message fails alone. Nothing is stored partially either way: each statement is
        atomic."""
        sent.statement = True
        try:
            return await batch.store_batch(con, messages)
        except Exception as exc:
            if len(messages) == 1 or fails_every_message(exc):
                raise
            log.info(
                "batch of %d refused (%s); storing its messages one by one",
                len(messages),
                describe(exc),
            )
        self._commit.count_isolated_batch()
        outcomes: list[Outcome] = []
        for rows in messages:
            try:
                outcomes += await batch.store_batch(con, [rows])
            except Exception as exc:
                outcomes.append(as_store_error(exc))
        return outcomes

    async def ping(self) -> None:
        async def op(con: asyncpg.Connection) -> None:
            await con.fetchval("SELECT 1", timeout=PING_TIMEOUT)

        await self._bridge.call(op, PING_TIMEOUT)

    async def server_connections(self) -> ServerConnections:
        """The original's connection-pool query: sessions of every host on this database."""

        async def op(con: asyncpg.Connection) -> ServerConnections:
            row = await con.fetchrow(queries.SERVER_CONNECTIONS, timeout=PING_TIMEOUT)
            return ServerConnections(active=row[0], maximum=row[1])

        return await self._bridge.call(op, PING_TIMEOUT)

    def pool_stats(self) -> PoolStats:
        pool = self._bridge.pool
        size = pool.get_size()
        idle = pool.get_idle_size() + self._bridge.held_idle
        return PoolStats(active=max(size - idle, 0), maximum=pool.get_max_size())

    async def aclose(self) -> None:
        """Stop the group commit, then close the pool.

        Queued messages fail with :class:`StoreUnavailable` (their senders retry); the
        batch in flight gets CLOSE_TIMEOUT to finish. Then the pool waits as long for
        connections in use and cuts them.
        """
        await self._commit.aclose(CLOSE_TIMEOUT)
        await self._bridge.close()

    # -- schema --

    async def check_schema(self) -> None:
        """Raise :class:`~relate_smtp.storage.SchemaMissing` when a Relate table or column
        this host uses is absent (the server calls this at start-up),
        :class:`StoreUnavailable` when the database cannot be reached."""
        await schema.check_schema(self._bridge)

    async def init_schema(self) -> None:
        """``relate-smtp db init`` (SPEC §8); see :func:`.schema.init_schema`."""
        await schema.init_schema(self._bridge)

    # -- AdminStore --

    async def _insert_user(self, new: NewUser) -> None:
        user = new.user

        async def op(con: asyncpg.Connection) -> None:
            async with con.transaction():
                owned = await con.fetch(queries.OWNED_ADDRESSES, list(new.addresses))
                refuse_taken(new, {row["address"] for row in owned})
                await con.execute(
                    queries.INSERT_USER,
                    user.id,
                    str(user.id),
                    CLI_OIDC_ISSUER,
                    user.email,
                    user.display_name,
                    new.created_at,
                )
                if new.aliases:
                    await con.execute(
                        queries.INSERT_ALIASES,
                        user.id,
                        new.created_at,
                        [alias_id for alias_id, _ in new.aliases],
                        [address for _, address in new.aliases],
                    )

        await self._bridge.call(op)

    async def _insert_api_key(self, key: ApiKey) -> None:
        async def op(con: asyncpg.Connection) -> None:
            try:
                await con.execute(
                    queries.INSERT_KEY,
                    key.id,
                    key.user_id,
                    key.name,
                    key.key_hash,
                    key.key_prefix,
                    key.scopes,
                    key.created_at,
                )
            except asyncpg.ForeignKeyViolationError:
                raise UserNotFound(key.user_id) from None

        await self._bridge.call(op)

    async def list_api_keys(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        async def op(con: asyncpg.Connection) -> Sequence[ApiKey]:
            return [queries.api_key(row) for row in await con.fetch(queries.KEYS_OF_USER, user_id)]

        return await self._bridge.call(op)

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        async def op(con: asyncpg.Connection) -> bool:
            status = await con.execute(queries.REVOKE_KEY, key_id, datetime.now(UTC))
            return bool(status == "UPDATE 1")

        return await self._bridge.call(op)

    async def list_emails(self, limit: int = 50) -> Sequence[StoredEmail]:
        async def op(con: asyncpg.Connection) -> Sequence[StoredEmail]:
            rows = await con.fetch(queries.LATEST_EMAILS, max(limit, 0))
            ids = [row["Id"] for row in rows]
            recipients: dict[uuid.UUID, list[RecipientRow]] = {}
            if ids:
                for r in await con.fetch(queries.RECIPIENTS_OF, ids):
                    recipients.setdefault(r["EmailId"], []).append(queries.recipient(r))
            return [
                queries.stored_email(row, tuple(recipients.get(row["Id"], ())), ()) for row in rows
            ]

        return await self._bridge.call(op)

    async def get_email(self, email_id: uuid.UUID) -> StoredEmail | None:
        async def op(con: asyncpg.Connection) -> StoredEmail | None:
            async with con.transaction(readonly=True, isolation="repeatable_read"):
                row = await con.fetchrow(queries.EMAIL, email_id)
                if row is None:
                    return None
                recipients = await con.fetch(queries.RECIPIENTS_OF, [email_id])
                attachments = await con.fetch(queries.ATTACHMENTS_OF, email_id)
            return queries.stored_email(
                row,
                tuple(queries.recipient(r) for r in recipients),
                tuple(queries.attachment(a) for a in attachments),
            )

        return await self._bridge.call(op)


@asynccontextmanager
async def open_postgres_store(
    connection: PostgresParams | str,
) -> AsyncIterator[PostgresStore]:
    """Open the PostgreSQL store for the duration of the ``async with`` block.

    ``connection`` is parsed parameters or ``ConnectionStrings:DefaultConnection`` itself
    (a bad string raises :class:`ValueError` before anything is opened).

    Runs the store's asyncio loop in a thread for that duration, creates the
    connection pool without connecting, and closes them on exit. Never raises because
    the database is down: calls raise :class:`StoreUnavailable` until it is back. Call
    :meth:`PostgresStore.check_schema` at start-up to refuse a database without tables.

    Methods may be called from any Trio task while the block is open, including tasks
    of nurseries opened outside it; they must not be called after it exits.
    """
    params = parse_connection_string(connection) if isinstance(connection, str) else connection
    if params.ignored:
        log.warning(
            "ConnectionStrings:DefaultConnection: %s accepted but has no effect here "
            "(Npgsql-only settings)",
            ", ".join(params.ignored),
        )
    async with open_bridge(params) as bridge:
        store = PostgresStore(bridge)
        try:
            yield store
        finally:
            await store.aclose()
