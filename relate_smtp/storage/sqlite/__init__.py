"""The embedded SQLite store (:class:`SqliteStore`): connections and errors in
:mod:`.connection`, SQL and row mapping in :mod:`.queries`, saving mail in
:mod:`.saving`, the store itself in :mod:`.store`."""

from relate_smtp.storage.sqlite.store import DEFAULT_MAX_THREADS, SqliteStore

__all__ = ["DEFAULT_MAX_THREADS", "SqliteStore"]
