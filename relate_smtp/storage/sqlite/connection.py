"""SQLite connections: opening the file privately in WAL mode, transactions, and what a
driver error means to the store (transient or not).

The file holds all mail and the API key hashes, so it is created mode 0600 whatever the
umask; SQLite gives the ``-wal`` and ``-shm`` files it creates the main file's
permissions. An existing file that others may read is reported, not changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

from relate_smtp.storage.errors import SchemaMissing, StoreError, StoreUnavailable

T = TypeVar("T")

log = logging.getLogger("relate_smtp.storage")

# Primary result codes that mean "try again later" rather than "this is wrong".
_TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_READONLY,
    }
)
_LOCK_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _primary_code(exc: sqlite3.Error) -> int | None:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def store_error(exc: sqlite3.Error) -> StoreError:
    """Translate a driver error into the store's vocabulary (transient or not)."""
    error: StoreError
    if _primary_code(exc) in _TRANSIENT_CODES:
        error = StoreUnavailable(f"SQLite store unavailable: {exc}")
    elif "no such table" in str(exc):
        error = SchemaMissing(f"SQLite store lacks the Relate tables: {exc}")
    else:
        error = StoreError(f"SQLite store error: {exc}")
    error.__cause__ = exc
    return error


def is_lock_error(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in _LOCK_CODES


def schema_sql() -> str:
    return resources.files("relate_smtp.storage").joinpath("schema/sqlite.sql").read_text("utf-8")


# Switching a new file to WAL needs an exclusive lock. SQLite refuses it at once,
# without waiting busy_timeout, to one of two connections that would otherwise deadlock
# switching together; on the next try the other has finished, or holds the lock and
# busy_timeout applies. Several stores opening one new file at once need a few tries.
_WAL_ATTEMPTS = 10


def _use_wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    for attempt in range(_WAL_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_lock_error(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise


_PRIVATE_MODE = 0o600
_NOT_OWNER = 0o077
_FILE_SUFFIXES = ("", "-wal", "-shm")


def _create_private(path: str) -> None:
    """Create the database file 0600 before SQLite would create it 0666 less the umask.

    The mode given to ``os.open`` leaves the process umask alone for other threads;
    ``fchmod`` undoes a umask that would take the owner's bits too. An existing file is
    left as it is, and a failure is left for SQLite to report in its own terms.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_MODE)
    except OSError:
        return
    try:
        os.fchmod(fd, _PRIVATE_MODE)
    finally:
        os.close(fd)


def _exposed_files(path: str) -> list[str]:
    """The database's files that users other than the owner may open, with their modes."""
    exposed = []
    for name in (path + suffix for suffix in _FILE_SUFFIXES):
        try:
            mode = os.stat(name).st_mode & 0o777
        except OSError:
            continue
        if mode & _NOT_OWNER:
            exposed.append(f"{name} ({mode:04o})")
    return exposed


def warn_if_exposed(path: str) -> None:
    """Warn rather than chmod: the operator may share the file on purpose (a backup group)."""
    exposed = _exposed_files(path)
    if exposed:
        log.warning(
            "the SQLite store holds all mail and the API key hashes but others may read it: "
            "%s; chmod 600 to keep it private",
            ", ".join(exposed),
        )


def connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    _create_private(path)
    # isolation_level=None: autocommit; every transaction below is an explicit BEGIN.
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # On failure the pool discards the connection, which is still in a transaction.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def in_write_transaction(work: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    # IMMEDIATE takes the write lock up front, so a conflict surfaces (after
    # busy_timeout) at BEGIN instead of as an un-retryable upgrade failure mid-way.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return result


def in_read_transaction(work: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """Several SELECTs that must see one snapshot."""
    conn.execute("BEGIN")
    try:
        return work(conn)
    finally:
        rollback(conn)
