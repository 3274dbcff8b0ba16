"""Open the store the settings name: PostgreSQL when a connection string is set, else the
embedded SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relate_smtp.config import Settings
from relate_smtp.storage import AdminStore


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[AdminStore]:
    if settings.default_connection:
        from relate_smtp.storage.postgres import open_postgres_store

        async with open_postgres_store(settings.default_connection) as postgres:
            yield postgres
        return
    from relate_smtp.storage.sqlite import SqliteStore

    store: AdminStore = await SqliteStore.open(settings.storage.sqlite_path)
    try:
        yield store
    finally:
        await store.aclose()
