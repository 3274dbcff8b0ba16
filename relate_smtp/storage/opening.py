"""Open the store the settings name: PostgreSQL when a connection string is set, else the
embedded SQLite file."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from relate_smtp.config import Settings
from relate_smtp.storage import AdminStore, StoreError

log = logging.getLogger(__name__)


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
    # SPEC §2: say where mail goes, so nobody mistakes a local file for the platform's
    # database (the original falls back to a development database with a warning too).
    log.warning(
        "ConnectionStrings:DefaultConnection is empty: storing mail in the embedded SQLite file %s",
        await trio.Path(path).absolute(),
    )
    try:
        store: AdminStore = await SqliteStore.open(path)
    except StoreError as exc:
        raise StoreOpenError(f"Storage:SqlitePath: cannot open {path!r}: {exc}") from None
    try:
        yield store
    finally:
        await store.aclose()
