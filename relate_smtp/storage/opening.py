"""Open the store the settings name: PostgreSQL when a connection string is set, else the
embedded SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relate_smtp.config import Settings
from relate_smtp.storage import AdminStore, StoreError


class StoreOpenError(StoreError):
    """The configured store cannot be opened at all; the message names the setting."""


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[AdminStore]:
    if settings.default_connection:
        from relate_smtp.storage.postgres import open_postgres_store

        async with open_postgres_store(settings.default_connection) as postgres:
            yield postgres
        return
    from relate_smtp.storage.sqlite import SqliteStore

    path = settings.storage.sqlite_path
    try:
        store: AdminStore = await SqliteStore.open(path)
    except StoreError as exc:
        raise StoreOpenError(f"Storage:SqlitePath: cannot open {path!r}: {exc}") from None
    try:
        yield store
    finally:
        await store.aclose()
