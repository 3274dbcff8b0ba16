"""What an asyncpg failure means to the store: worth retrying, a missing schema, a
refusal, or a bug (SPEC §10)."""

from __future__ import annotations

from typing import Final

import asyncpg

from relate_smtp.storage.errors import SchemaMissing, StoreError, StoreUnavailable
from relate_smtp.storage.groupcommit import describe

__all__ = ["as_store_error", "fails_every_message", "is_transient"]

# SQLSTATE classes that mean "try again later": 08 connection exception, 53 insufficient
# resources, 57 operator intervention (admin shutdown, cannot connect now, statement
# timeout), 58 system error, 40 transaction rollback (serialization, deadlock),
# 3D database does not exist yet, 28 authentication (a password being rotated). A bad
# password is also a configuration error, but answering 4xx and reporting Unhealthy is
# the right outcome for both.
_TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57", "58", "40", "3D", "28"})
_TRANSIENT_SQLSTATES: Final = frozenset({"55P03"})  # lock_not_available


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, unreachable, timed out
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    if isinstance(exc, asyncpg.InterfaceError):
        # Each call has its connection to itself, so the client-side errors left are
        # the ones a lost connection causes ("connection is closed", "released back to
        # the pool" when the pool detached it, a transaction that cannot end) — except
        # bad arguments and bad settings, which are not going to get better.
        return not isinstance(exc, asyncpg.DataError | asyncpg.ClientConfigurationError)
    # A connection the server has just killed can be handed out before asyncpg has seen
    # it close: it is still consuming the server's FATAL error and refuses a new query
    # ("another operation is in progress"). The pool discards it on release; this call
    # is simply unlucky.
    return isinstance(exc, asyncpg.InternalClientError)


def as_store_error(exc: Exception) -> Exception:
    """What a caller sees for ``exc``: StoreUnavailable when worth retrying, SchemaMissing
    for absent tables, StoreError when the database refused; anything else is a bug and
    stays itself."""
    if isinstance(exc, StoreError):
        return exc
    mapped: Exception
    if isinstance(exc, asyncpg.UndefinedTableError):
        mapped = SchemaMissing(f"{exc}: the Relate tables are missing; run `relate-smtp db init`")
    elif is_transient(exc):
        mapped = StoreUnavailable(f"PostgreSQL unavailable: {describe(exc)}")
    elif isinstance(exc, asyncpg.PostgresError | asyncpg.DataError):
        # The database refused the statement (a constraint, a value it cannot take): a
        # permanent failure of this call, which rolled back.
        mapped = StoreError(f"PostgreSQL refused the operation: {describe(exc)}")
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


def fails_every_message(exc: Exception) -> bool:
    """A batch failure that retrying its messages one by one cannot cure: the
    connection or the server (transient), or the schema."""
    return is_transient(exc) or isinstance(
        exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError
    )
