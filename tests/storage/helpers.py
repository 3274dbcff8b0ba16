"""Helpers for the storage tests: record builders, the raw access the contract suite
needs, and PostgreSQL test databases.

PostgreSQL for tests: a uniquely named database per test, dropped afterwards.

The server is ``RELATE_SMTP_TEST_POSTGRES`` (a ``postgresql://`` URL to a database the
test user may connect to with the right to create databases), by default the local
trust-auth server at ``postgresql://postgres@127.0.0.1:5432/postgres``.

When that server cannot be reached the test is skipped with the reason, except when
``CI=true``: there a missing database is a failure, so a broken CI service can never
turn the PostgreSQL suite into a row of silent skips (the ``postgres_available``
fixture in ``tests/conftest.py`` checks before a test starts).

Raw SQL (setting up rows the store API cannot make, checking what is left in the
tables, killing the store's connections) goes through asyncpg on the same trio-asyncio
loop the store joins, so a test never runs two asyncio loops.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Set
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol, TypeVar

import asyncpg
import attrs
import pytest
import trio
import trio_asyncio

from relate_smtp.storage import Attachment, HeaderRecipient, NewEmail
from relate_smtp.storage.connstring import PostgresParams, parse_connection_string
from relate_smtp.storage.postgres import PostgresStore, open_postgres_store
from relate_smtp.storage.records import RECIPIENT_BCC, RECIPIENT_CC, RECIPIENT_TO

__all__ = [
    "ADMIN_URL",
    "REACH_TIMEOUT",
    "TABLES",
    "PostgresRawAccess",
    "PostgresTestBackend",
    "RawAccess",
    "RawSession",
    "Schema",
    "TempDatabase",
    "attachment",
    "bcc",
    "cc",
    "new_email",
    "open_postgres_backend",
    "postgres_unreachable",
    "temporary_database",
    "to",
]


# --------------------------------------------------------------------------- records


def new_email(**changes: Any) -> NewEmail:
    """A plain message with a fresh id and Message-ID; ``changes`` override fields."""
    email = NewEmail(
        id=uuid.uuid4(),
        message_id=f"{uuid.uuid4()}@sender.example",
        from_address="sender@sender.example",
        from_display_name="Sender",
        subject="Hello",
        text_body="Hello there.",
        html_body=None,
        received_at=datetime.now(UTC),
        size_bytes=321,
        in_reply_to=None,
        references=None,
        sent_by_user_id=None,
        header_recipients=(),
        envelope_recipients=(),
    )
    return attrs.evolve(email, **changes)


def to(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_TO)


def cc(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_CC)


def bcc(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_BCC)


def attachment(name: str, content: bytes, content_type: str = "application/pdf") -> Attachment:
    return Attachment(file_name=name, content_type=content_type, content=content)


# --------------------------------------------------------------------------- raw access

TABLES = (
    "Users",
    "UserEmailAddresses",
    "SmtpApiKeys",
    "Emails",
    "EmailRecipients",
    "EmailAttachments",
)


class RawAccess(Protocol):
    async def add_alias(self, user_id: uuid.UUID, address: str, *, verified: bool) -> None: ...

    async def add_legacy_api_key(
        self, user_id: uuid.UUID, *, key_hash: str, scopes: str
    ) -> uuid.UUID:
        """A key row with a null ``KeyPrefix``, as older platform versions wrote them."""
        ...

    async def oidc_identity(self, user_id: uuid.UUID) -> tuple[str, str]:
        """``(OidcIssuer, OidcSubject)`` of a user."""
        ...

    async def count_rows(self, table: str) -> int: ...

    async def email_references(self, email_id: uuid.UUID) -> str | None:
        """The ``References`` column of one ``Emails`` row, as stored."""
        ...


# --------------------------------------------------------------------------- PostgreSQL

T = TypeVar("T")

ADMIN_URL = os.environ.get(
    "RELATE_SMTP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REACH_TIMEOUT = 5.0
WAIT_TIMEOUT = 10.0
PLATFORM_SCHEMA = Path(__file__).parent / "fixtures" / "relate_platform_schema.sql"

Schema = Literal["empty", "init", "platform"]


def postgres_unreachable(reason: str) -> NoReturn:
    """Skip locally, fail under CI (``CI=true``), naming what was tried."""
    message = f"PostgreSQL test server unavailable ({ADMIN_URL}): {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@attrs.frozen
class RawSession:
    con: asyncpg.Connection
    loop: Any

    async def execute(self, sql: str, *args: Any) -> str:
        status: str = await trio_asyncio.aio_as_trio(self.con.execute, loop=self.loop)(sql, *args)
        return status

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await trio_asyncio.aio_as_trio(self.con.fetchval, loop=self.loop)(sql, *args)


@attrs.frozen
class TempDatabase:
    """A database of its own for one test; ``params`` point the store at it."""

    name: str
    params: PostgresParams
    loop: Any  # the trio-asyncio loop

    async def _on_loop(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            con = await asyncpg.connect(**_connect_kwargs(self.params), timeout=REACH_TIMEOUT)
            try:
                return await fn(con)
            finally:
                await con.close()

        result: T = await trio_asyncio.aio_as_trio(run, loop=self.loop)()
        return result

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._on_loop(lambda con: con.execute(sql, *args))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[RawSession]:
        """One connection kept open across calls (to hold a lock or a transaction)."""
        con = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=self.loop)(
            **_connect_kwargs(self.params), timeout=REACH_TIMEOUT
        )
        try:
            yield RawSession(con=con, loop=self.loop)
        finally:
            await trio_asyncio.aio_as_trio(con.close, loop=self.loop)()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._on_loop(lambda con: con.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._on_loop(lambda con: con.fetchval(sql, *args))

    @asynccontextmanager
    async def locked(self, table: str, mode: str = "EXCLUSIVE") -> AsyncIterator[None]:
        """Hold a lock on ``table`` until the context exits, from a connection of its own.

        ``"EmailRecipients"`` in ``EXCLUSIVE`` mode (the default mode) stops a save inside
        its statement (every variant of the batch statement inserts recipients) and blocks
        no reads; ``"Users"`` in ``ACCESS EXCLUSIVE`` mode blocks address lookups too.
        """
        assert table in TABLES
        async with self.session() as session:
            await session.execute("BEGIN")
            await session.execute(f'LOCK TABLE "{table}" IN {mode} MODE')
            try:
                yield
            finally:
                await session.execute("ROLLBACK")

    async def sessions_waiting_on_locks(
        self, count: int, *, besides: Set[int] = frozenset()
    ) -> set[int]:
        """The pids of the store's sessions (``params.application_name``) waiting on a
        lock, once there are ``count`` of them not in ``besides`` (sessions already
        killed linger a moment in ``pg_stat_activity``). Polls: PostgreSQL cannot tell us.
        Gives up after WAIT_TIMEOUT seconds.
        """
        with trio.fail_after(WAIT_TIMEOUT):
            while True:
                rows = await self.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1"
                    " AND application_name = $2 AND wait_event_type = 'Lock'",
                    self.name,
                    self.params.application_name,
                )
                pids = {row["pid"] for row in rows} - besides
                if len(pids) >= count:
                    return pids
                await trio.sleep(0.02)

    async def terminate(self, pids: Collection[int]) -> int:
        """``pg_terminate_backend`` each of ``pids``; returns how many were signalled."""
        return int(
            await self.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM unnest($1::int[]) AS pid",
                sorted(pids),
            )
        )

    async def terminate_connections(self, application_name: str) -> int:
        """``pg_terminate_backend`` every session of ``application_name`` on this
        database; returns how many were killed."""
        return int(
            await self.fetchval(
                "SELECT count(*) FROM ("
                "  SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                "  WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()"
                ") AS killed",
                self.name,
                application_name,
            )
        )


def _connect_kwargs(params: PostgresParams) -> dict[str, Any]:
    return {
        "host": params.host,
        "port": params.port,
        "user": params.user,
        "password": params.password,
        "database": params.database,
        "ssl": params.ssl,
    }


def _schema_sql(schema: Schema) -> str | None:
    if schema == "init":
        return resources.files("relate_smtp.storage").joinpath("schema/postgres.sql").read_text()
    if schema == "platform":
        return PLATFORM_SCHEMA.read_text()
    return None


@asynccontextmanager
async def temporary_database(
    schema: Schema = "init", *, application_name: str | None = None
) -> AsyncIterator[TempDatabase]:
    """Open a trio-asyncio loop, create a fresh database, yield it, drop it.

    ``schema``: ``"empty"`` (no tables), ``"init"`` (the script ``relate-smtp db init``
    runs on an empty database) or ``"platform"`` (the fixture: the platform's four EF
    migrations as the Npgsql provider scripts them, history rows included).
    ``application_name`` tags the store's connections so a test can kill just those.
    """
    admin = parse_connection_string(ADMIN_URL)
    name = f"relate_smtp_test_{uuid.uuid4().hex[:16]}"
    unreachable: str | None = None
    async with trio_asyncio.open_loop() as loop:

        async def admin_execute(sql: str) -> None:
            con = await asyncpg.connect(**_connect_kwargs(admin), timeout=REACH_TIMEOUT)
            try:
                await con.execute(sql)
            finally:
                await con.close()

        try:
            await trio_asyncio.aio_as_trio(admin_execute, loop=loop)(f'CREATE DATABASE "{name}"')
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            # Skip (or fail) only after leaving the loop: raised inside, pytest's outcome
            # would arrive wrapped in the loop's exception group and lose its reason.
            unreachable = f"{type(exc).__name__}: {exc}"
        else:
            params = attrs.evolve(
                admin,
                database=name,
                application_name=application_name or f"relate-smtp-test-{name[-6:]}",
                max_pool_size=10,
            )
            db = TempDatabase(name=name, params=params, loop=loop)
            try:
                sql = _schema_sql(schema)
                if sql is not None:
                    await db.execute(sql)
                yield db
            finally:
                # Shielded: a test that failed (and so was cancelled) still drops its
                # database rather than leaving it on the shared server.
                with trio.CancelScope(shield=True), trio.fail_after(30):
                    await trio_asyncio.aio_as_trio(admin_execute, loop=loop)(
                        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                    )
    if unreachable is not None:
        postgres_unreachable(unreachable)


@attrs.frozen
class PostgresRawAccess:
    """The storage contract suite's ``RawAccess`` on a temporary PostgreSQL database."""

    db: TempDatabase

    async def add_alias(self, user_id: uuid.UUID, address: str, *, verified: bool) -> None:
        await self.db.execute(
            'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified", '
            '"AddedAt") VALUES ($1, $2, $3, $4, $5)',
            uuid.uuid4(),
            user_id,
            address,
            verified,
            datetime.now(UTC),
        )

    async def add_legacy_api_key(
        self, user_id: uuid.UUID, *, key_hash: str, scopes: str
    ) -> uuid.UUID:
        key_id = uuid.uuid4()
        await self.db.execute(
            'INSERT INTO "SmtpApiKeys" ("Id", "UserId", "Name", "KeyHash", "KeyPrefix", '
            '"Scopes", "CreatedAt") VALUES ($1, $2, $3, $4, NULL, $5, $6)',
            key_id,
            user_id,
            "legacy",
            key_hash,
            scopes,
            datetime.now(UTC),
        )
        return key_id

    async def oidc_identity(self, user_id: uuid.UUID) -> tuple[str, str]:
        (row,) = await self.db.fetch(
            'SELECT "OidcIssuer", "OidcSubject" FROM "Users" WHERE "Id" = $1', user_id
        )
        return row["OidcIssuer"], row["OidcSubject"]

    async def count_rows(self, table: str) -> int:
        assert table in TABLES
        return int(await self.db.fetchval(f'SELECT count(*) FROM "{table}"'))

    async def email_references(self, email_id: uuid.UUID) -> str | None:
        references: str | None = await self.db.fetchval(
            'SELECT "References" FROM "Emails" WHERE "Id" = $1', email_id
        )
        return references


@attrs.frozen
class PostgresTestBackend:
    """Shaped like the contract suite's ``Backend``: the store under test and raw access."""

    store: PostgresStore
    raw: PostgresRawAccess
    db: TempDatabase


@asynccontextmanager
async def open_postgres_backend(
    tmp_path: Path | None = None, *, schema: Schema = "init"
) -> AsyncIterator[PostgresTestBackend]:
    """A store on a fresh database (``tmp_path`` is accepted for the contract suite's
    opener signature and unused)."""
    del tmp_path
    async with (
        temporary_database(schema) as db,
        open_postgres_store(db.params) as store,
    ):
        yield PostgresTestBackend(store=store, raw=PostgresRawAccess(db), db=db)
