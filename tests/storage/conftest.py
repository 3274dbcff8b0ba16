"""Fixtures for the storage contract suite: every test runs once per backend.

A backend is an opener in ``OPENERS`` named in ``BACKENDS``. It yields a
:class:`Backend`: the store under test, plus :class:`RawAccess` for the few rows the
store API cannot make (unverified aliases, legacy keys) and for checking what is left
in the tables.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import attrs
import pytest
import trio

from relate_smtp.storage import AdminStore
from relate_smtp.storage.sqlite import SqliteStore
from tests.storage.helpers import TABLES, RawAccess, Schema, open_postgres_backend


class Backend(Protocol):
    @property
    def store(self) -> AdminStore: ...

    @property
    def raw(self) -> RawAccess: ...


@attrs.frozen
class SqliteBackend:
    store: SqliteStore
    raw: SqliteRawAccess


@attrs.frozen
class SqliteRawAccess:
    path: Path

    async def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        def work() -> list[tuple[Any, ...]]:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                return conn.execute(sql, params).fetchall()

        return await trio.to_thread.run_sync(work)

    async def add_alias(self, user_id: uuid.UUID, address: str, *, verified: bool) -> None:
        await self._execute(
            'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified", "AddedAt")'
            " VALUES (?, ?, ?, ?, ?)",
            (str(uuid.uuid4()), str(user_id), address, int(verified), _now_text()),
        )

    async def add_legacy_api_key(
        self, user_id: uuid.UUID, *, key_hash: str, scopes: str
    ) -> uuid.UUID:
        key_id = uuid.uuid4()
        await self._execute(
            'INSERT INTO "SmtpApiKeys" ("Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes",'
            ' "CreatedAt") VALUES (?, ?, ?, ?, NULL, ?, ?)',
            (str(key_id), str(user_id), "legacy", key_hash, scopes, _now_text()),
        )
        return key_id

    async def oidc_identity(self, user_id: uuid.UUID) -> tuple[str, str]:
        rows = await self._execute(
            'SELECT "OidcIssuer", "OidcSubject" FROM "Users" WHERE "Id" = ?', (str(user_id),)
        )
        ((issuer, subject),) = rows
        return issuer, subject

    async def count_rows(self, table: str) -> int:
        assert table in TABLES
        ((count,),) = await self._execute(f'SELECT count(*) FROM "{table}"')
        return int(count)

    async def email_references(self, email_id: uuid.UUID) -> str | None:
        ((references,),) = await self._execute(
            'SELECT "References" FROM "Emails" WHERE "Id" = ?', (str(email_id),)
        )
        return cast(str | None, references)


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@asynccontextmanager
async def open_sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    path = tmp_path / "relate-smtp.db"
    store = await SqliteStore.open(path)
    try:
        yield SqliteBackend(store=store, raw=SqliteRawAccess(path))
    finally:
        await store.aclose()


def _postgres(schema: Schema) -> Callable[[Path], AbstractAsyncContextManager[Backend]]:
    @asynccontextmanager
    async def opener(tmp_path: Path) -> AsyncIterator[Backend]:
        async with open_postgres_backend(tmp_path, schema=schema) as opened:
            yield opened

    return opener


OPENERS: dict[str, Callable[[Path], AbstractAsyncContextManager[Backend]]] = {
    "sqlite": open_sqlite,
    # a database set up by `relate-smtp db init`
    "postgres": _postgres("init"),
    # a database set up by the platform's own migrations, never touched by `db init`
    "postgres-platform": _postgres("platform"),
}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("postgres-platform", id="postgres-platform", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with OPENERS[request.param](tmp_path) as opened:
        yield opened


@pytest.fixture
def store(backend: Backend) -> AdminStore:
    return backend.store


@pytest.fixture
def raw(backend: Backend) -> RawAccess:
    return backend.raw
