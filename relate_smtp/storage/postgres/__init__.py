"""The PostgreSQL store, the platform's own database (SPEC §8).

:mod:`.bridge` runs asyncpg in an asyncio loop of its own thread behind plain Trio calls and
:mod:`.pool` builds the pool the connection string describes; :mod:`.errors` says which
failures are transient; :mod:`.schema` checks the tables and runs ``db init``;
:mod:`.queries` and :mod:`.batch` hold the SQL; :mod:`.store` is the store itself.
"""

from relate_smtp.storage.groupcommit import GroupCommitStats
from relate_smtp.storage.postgres.store import PostgresStore, open_postgres_store

__all__ = ["GroupCommitStats", "PostgresStore", "open_postgres_store"]
