"""The embedded SQLite store, so that ``relate-smtp serve`` runs with no database server.

sqlite3 blocks, so every call runs in a worker thread (``trio.to_thread.run_sync``)
bounded by a :class:`trio.CapacityLimiter`. Each of those threads borrows a connection
from a small pool and gives it back (``check_same_thread=False``, because Trio reuses
worker threads freely but never shares a connection between two at once). A pool
rather than one locked connection lets address and key lookups read in parallel with a
commit, which WAL allows.

Writes are serialised in this process by a Trio lock, so our own connections never
meet SQLite's sleep-and-retry busy handler; several server processes sharing the file
are serialised by SQLite's lock and wait up to ``busy_timeout`` for each other.

Concurrent :meth:`SqliteStore.save_email` calls are group-committed: callers queue up
behind the write lock and whoever gets it stores every queued message in one
transaction, each inside its own savepoint so a bad message is rolled back alone and
fails alone.

Values are stored as the platform's columns expect them: uuids as lower-case canonical
text, times as ISO-8601 UTC text with microseconds (so text order is time order),
booleans as 0/1, attachment content as BLOBs.

The file holds all mail and the API key hashes, so the store creates it mode 0600
whatever the umask; SQLite gives the ``-wal`` and ``-shm`` files it creates the main
file's permissions. An existing file that others may read is reported, not changed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import string
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import attrs
import trio

from relate_smtp.storage import (
    ApiKey,
    Attachment,
    NewEmail,
    PoolStats,
    RecipientRow,
    SavedEmail,
    SchemaMissing,
    StoredEmail,
    StoreError,
    StoreUnavailable,
    User,
    link_recipients,
)
from relate_smtp.storage.records import (
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    KEY_NAME_MAX,
    SCOPES_MAX,
)

__all__ = ["CLI_OIDC_ISSUER", "SqliteStore"]

T = TypeVar("T")

log = logging.getLogger("relate_smtp.storage")

CLI_OIDC_ISSUER = "relate-smtp-cli"
KEY_HASH_MAX = 128

DEFAULT_MAX_THREADS = 8
DEFAULT_BUSY_TIMEOUT_MS = 5000
# Enough to absorb a burst of concurrent deliveries; small enough that one transaction
# stays short and a batch-wide failure (then retried message by message) stays cheap.
DEFAULT_MAX_BATCH = 64

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

# SQLite's lower() folds ASCII only; query values are folded the same way so that an
# index on lower(column) is used and both sides agree.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _store_error(exc: sqlite3.Error) -> StoreError:
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


def _is_lock_error(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in _LOCK_CODES


def _uuid_text(value: uuid.UUID) -> str:
    return str(value)


def _opt_uuid_text(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _opt_uuid(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(value)


def _ts(value: datetime) -> str:
    """ISO-8601 UTC text; a naive datetime is taken to be UTC already."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _opt_dt(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


def _now() -> datetime:
    return datetime.now(UTC)


def _schema_sql() -> str:
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
            if not _is_lock_error(exc) or attempt == _WAL_ATTEMPTS - 1:
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


def _warn_if_exposed(path: str) -> None:
    """Warn rather than chmod: the operator may share the file on purpose (a backup group)."""
    exposed = _exposed_files(path)
    if exposed:
        log.warning(
            "the SQLite store holds all mail and the API key hashes but others may read it: "
            "%s; chmod 600 to keep it private",
            ", ".join(exposed),
        )


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
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


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # On failure the pool discards the connection, which is still in a transaction.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _in_write_transaction(work: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    # IMMEDIATE takes the write lock up front, so a conflict surfaces (after
    # busy_timeout) at BEGIN instead of as an un-retryable upgrade failure mid-way.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


def _in_read_transaction(work: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """Several SELECTs that must see one snapshot."""
    conn.execute("BEGIN")
    try:
        return work(conn)
    finally:
        _rollback(conn)


# --- queries -------------------------------------------------------------------------

# Additional addresses count verified or not (SPEC §4: the platform adds them unverified
# and cannot verify them); a primary address beats them, then the lowest user id wins.
_USERS_BY_ADDRESSES = """
SELECT u."Email", u."Id", 0 AS "Rank" FROM "Users" u
 WHERE lower(u."Email") IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT a."Address", a."UserId", 1 AS "Rank" FROM "UserEmailAddresses" a
 WHERE lower(a."Address") IN (SELECT value FROM json_each(?1))
ORDER BY "Rank", 2
"""

_FIND_USER = """
SELECT "Id", "Email", "DisplayName" FROM (
  SELECT u."Id", u."Email", u."DisplayName", 0 AS "Rank" FROM "Users" u
   WHERE lower(u."Email") = ?1
  UNION ALL
  SELECT u."Id", u."Email", u."DisplayName", 1 AS "Rank"
    FROM "UserEmailAddresses" a JOIN "Users" u ON u."Id" = a."UserId"
   WHERE lower(a."Address") = ?1
) ORDER BY "Rank", "Id" LIMIT 1
"""

# The user's primary address, then each additional address that belongs to them: not
# another user's primary (SPEC §4) nor listed by a user with a lower id (_FIND_USER).
_USER_ADDRESSES = """
SELECT "Email", 0 FROM "Users" WHERE "Id" = ?1
UNION ALL
SELECT a."Address", 1 FROM "UserEmailAddresses" a WHERE a."UserId" = ?1
 AND NOT EXISTS (SELECT 1 FROM "Users" o
  WHERE o."Id" <> ?1 AND lower(o."Email") = lower(a."Address"))
 AND NOT EXISTS (SELECT 1 FROM "UserEmailAddresses" o
  WHERE o."UserId" < ?1 AND lower(o."Address") = lower(a."Address"))
ORDER BY 2, 1
"""

_PARENT = """
SELECT "Id", "ThreadId" FROM "Emails" WHERE "MessageId" IN (?, ?)
 ORDER BY "ReceivedAt", "Id" LIMIT 1
"""

_INSERT_EMAIL = """
INSERT INTO "Emails" ("Id", "MessageId", "FromAddress", "FromDisplayName", "Subject",
  "TextBody", "HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References",
  "ThreadId", "SentByUserId")
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_INSERT_RECIPIENT = """
INSERT INTO "EmailRecipients" ("Id", "EmailId", "Address", "DisplayName", "Type", "UserId",
  "IsRead")
VALUES (?, ?, ?, ?, ?, ?, 0)
"""

_INSERT_ATTACHMENT = """
INSERT INTO "EmailAttachments" ("Id", "EmailId", "FileName", "ContentType", "SizeBytes",
  "Content")
VALUES (?, ?, ?, ?, ?, ?)
"""

_EMAIL_COLUMNS = """
"Id", "MessageId", "FromAddress", "FromDisplayName", "Subject", "TextBody", "HtmlBody",
"ReceivedAt", "SizeBytes", "InReplyTo", "References", "ThreadId", "SentByUserId"
"""

_API_KEY_COLUMNS = """
"Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes", "CreatedAt", "LastUsedAt",
"RevokedAt"
"""


def _users_by_address(conn: sqlite3.Connection, addresses: Iterable[str]) -> dict[str, uuid.UUID]:
    """Lower-cased address → user, primary addresses taking precedence over aliases."""
    keys = sorted({_ascii_lower(address) for address in addresses})
    users: dict[str, uuid.UUID] = {}
    if not keys:
        return users
    for address, user_id, _rank in conn.execute(_USERS_BY_ADDRESSES, (json.dumps(keys),)):
        users.setdefault(address.lower(), uuid.UUID(user_id))
    return users


def _bare_message_id(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def _thread_id(conn: sqlite3.Connection, in_reply_to: str | None) -> uuid.UUID | None:
    """The parent's ThreadId, else the parent's Id; the original stored ids bare, but a
    bracketed row is matched too."""
    if not in_reply_to:
        return None
    bare = _bare_message_id(in_reply_to)
    if not bare:
        return None
    row = conn.execute(_PARENT, (bare, f"<{bare}>")).fetchone()
    if row is None:
        return None
    parent_id, parent_thread = row
    return uuid.UUID(parent_thread if parent_thread is not None else parent_id)


def _insert_email(conn: sqlite3.Connection, email: NewEmail) -> SavedEmail:
    users = _users_by_address(
        conn,
        [r.address for r in email.header_recipients] + list(email.envelope_recipients),
    )
    rows = link_recipients(email.header_recipients, email.envelope_recipients, users)
    thread_id = _thread_id(conn, email.in_reply_to)
    email_id = _uuid_text(email.id)
    conn.execute(
        _INSERT_EMAIL,
        (
            email_id,
            email.message_id,
            email.from_address,
            email.from_display_name,
            email.subject,
            email.text_body,
            email.html_body,
            _ts(email.received_at),
            email.size_bytes,
            email.in_reply_to,
            email.references,
            _opt_uuid_text(thread_id),
            _opt_uuid_text(email.sent_by_user_id),
        ),
    )
    conn.executemany(
        _INSERT_RECIPIENT,
        [
            (
                str(uuid.uuid4()),
                email_id,
                r.address,
                r.display_name,
                r.type,
                _opt_uuid_text(r.user_id),
            )
            for r in rows
        ],
    )
    conn.executemany(
        _INSERT_ATTACHMENT,
        [
            (str(uuid.uuid4()), email_id, a.file_name, a.content_type, len(a.content), a.content)
            for a in email.attachments
        ],
    )
    linked = tuple(dict.fromkeys(r.user_id for r in rows if r.user_id is not None))
    return SavedEmail(id=email.id, thread_id=thread_id, linked_user_ids=linked)


def _outcome_error(exc: Exception) -> Exception:
    return _store_error(exc) if isinstance(exc, sqlite3.Error) else exc


def _save_alone(conn: sqlite3.Connection, email: NewEmail) -> SavedEmail | Exception:
    try:
        return _in_write_transaction(functools.partial(_insert_email, email=email), conn)
    except Exception as exc:
        return _outcome_error(exc)


def _save_batch(
    conn: sqlite3.Connection, emails: Sequence[NewEmail]
) -> list[SavedEmail | Exception]:
    """Store ``emails`` in one transaction, one savepoint each; every message gets its
    own outcome (a record, or the exception its caller should see)."""
    if len(emails) == 1:
        return [_save_alone(conn, emails[0])]
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[SavedEmail | Exception] = []
        for email in emails:
            conn.execute("SAVEPOINT save_email")
            try:
                outcomes.append(_insert_email(conn, email))
            except Exception as exc:
                # After SQLITE_FULL, IOERR and the like SQLite may have abandoned the
                # whole transaction; only a surviving one can drop just this message.
                if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK TO save_email")
                outcomes.append(_outcome_error(exc))
            conn.execute("RELEASE save_email")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(conn)
        if _is_lock_error(exc):
            # Another process holds the lock; retrying each message would only wait
            # busy_timeout again per message. Everyone gets a 4xx and retries later.
            return [_store_error(exc) for _ in emails]
        # Anything else may be one message's fault (too big for the disk, say): give
        # each its own transaction so the others still get stored.
        return [_save_alone(conn, email) for email in emails]
    return outcomes


def _email_record(
    row: Sequence[Any],
    recipients: tuple[RecipientRow, ...] = (),
    attachments: tuple[Attachment, ...] = (),
) -> StoredEmail:
    return StoredEmail(
        id=uuid.UUID(row[0]),
        message_id=row[1],
        from_address=row[2],
        from_display_name=row[3],
        subject=row[4],
        text_body=row[5],
        html_body=row[6],
        received_at=_dt(row[7]),
        size_bytes=row[8],
        in_reply_to=row[9],
        references=row[10],
        thread_id=_opt_uuid(row[11]),
        sent_by_user_id=_opt_uuid(row[12]),
        recipients=recipients,
        attachments=attachments,
    )


def _recipient_record(row: Sequence[Any]) -> RecipientRow:
    return RecipientRow(address=row[0], display_name=row[1], type=row[2], user_id=_opt_uuid(row[3]))


def _api_key_record(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=uuid.UUID(row[0]),
        user_id=uuid.UUID(row[1]),
        name=row[2],
        key_hash=row[3],
        key_prefix=row[4],
        scopes=row[5],
        created_at=_dt(row[6]),
        last_used_at=_opt_dt(row[7]),
        revoked_at=_opt_dt(row[8]),
    )


def _recipients_of(
    conn: sqlite3.Connection, email_ids: Collection[str]
) -> dict[str, list[RecipientRow]]:
    by_email: dict[str, list[RecipientRow]] = {email_id: [] for email_id in email_ids}
    query = """
        SELECT "EmailId", "Address", "DisplayName", "Type", "UserId" FROM "EmailRecipients"
         WHERE "EmailId" IN (SELECT value FROM json_each(?)) ORDER BY rowid
    """
    for row in conn.execute(query, (json.dumps(list(email_ids)),)):
        by_email[row[0]].append(_recipient_record(row[1:]))
    return by_email


def _get_email(conn: sqlite3.Connection, email_id: str) -> StoredEmail | None:
    row = conn.execute(
        f'SELECT {_EMAIL_COLUMNS} FROM "Emails" WHERE "Id" = ?', (email_id,)
    ).fetchone()
    if row is None:
        return None
    attachments = tuple(
        Attachment(file_name=name, content_type=content_type, content=bytes(content))
        for name, content_type, content in conn.execute(
            'SELECT "FileName", "ContentType", "Content" FROM "EmailAttachments"'
            ' WHERE "EmailId" = ? ORDER BY rowid',
            (email_id,),
        )
    )
    recipients = tuple(_recipients_of(conn, [email_id])[email_id])
    return _email_record(row, recipients, attachments)


def _list_emails(conn: sqlite3.Connection, limit: int) -> list[StoredEmail]:
    rows = conn.execute(
        f'SELECT {_EMAIL_COLUMNS} FROM "Emails" ORDER BY "ReceivedAt" DESC, rowid DESC LIMIT ?',
        (limit,),
    ).fetchall()
    recipients = _recipients_of(conn, [row[0] for row in rows])
    return [_email_record(row, tuple(recipients[row[0]])) for row in rows]


def _check_length(what: str, value: str, maximum: int) -> None:
    if len(value) > maximum:
        raise ValueError(f"{what} is longer than {maximum} characters")


def _create_user(
    conn: sqlite3.Connection, email: str, display_name: str | None, aliases: Collection[str]
) -> User:
    # Case-insensitively distinct, the primary first.
    distinct: dict[str, str] = {}
    for address in [email, *aliases]:
        distinct.setdefault(address.lower(), address)
    addresses = list(distinct.values())
    for address in addresses:
        _check_length(f"address {address!r}", address, EMAIL_ADDRESS_MAX)
    if display_name is not None:
        _check_length("display name", display_name, DISPLAY_NAME_MAX)
    taken = _users_by_address(conn, addresses)
    for address in addresses:
        owner = taken.get(address.lower())
        if owner is not None:
            raise ValueError(f"address {address} already belongs to user {owner}")
    user_id = uuid.uuid4()
    now = _ts(_now())
    conn.execute(
        'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "DisplayName",'
        ' "CreatedAt") VALUES (?, ?, ?, ?, ?, ?)',
        (str(user_id), str(user_id), CLI_OIDC_ISSUER, email, display_name, now),
    )
    conn.executemany(
        'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified", "AddedAt")'
        " VALUES (?, ?, ?, 1, ?)",
        [(str(uuid.uuid4()), str(user_id), alias, now) for alias in addresses[1:]],
    )
    return User(id=user_id, email=email, display_name=display_name)


def _create_api_key(
    conn: sqlite3.Connection,
    user_id: uuid.UUID,
    name: str,
    key_hash: str,
    key_prefix: str | None,
    scopes: str,
) -> ApiKey:
    _check_length("key name", name, KEY_NAME_MAX)
    _check_length("key hash", key_hash, KEY_HASH_MAX)
    _check_length("scopes", scopes, SCOPES_MAX)
    exists = conn.execute('SELECT 1 FROM "Users" WHERE "Id" = ?', (str(user_id),)).fetchone()
    if exists is None:
        raise ValueError(f"no user with id {user_id}")
    key = ApiKey(
        id=uuid.uuid4(),
        user_id=user_id,
        name=name,
        key_hash=key_hash,
        key_prefix=key_prefix,
        scopes=scopes,
        # Stored as microsecond text; round here so the record equals what reads return.
        created_at=_dt(_ts(_now())),
    )
    conn.execute(
        f'INSERT INTO "SmtpApiKeys" ({_API_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)',
        (str(key.id), str(user_id), name, key_hash, key_prefix, scopes, _ts(key.created_at)),
    )
    return key


@attrs.define(eq=False)
class _PendingSave:
    """One caller's message waiting for the group commit, and then its outcome."""

    email: NewEmail
    outcome: SavedEmail | Exception | None = None


class SqliteStore:
    """:class:`~relate_smtp.storage.AdminStore` on a SQLite file.

    Build it with ``await SqliteStore.open(path)``, which also creates the tables; the
    constructor does no I/O. A relative ``path`` is taken relative to the current
    directory at construction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_threads: int = DEFAULT_MAX_THREADS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.path = os.path.abspath(os.fspath(path))
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._limiter = trio.CapacityLimiter(max_threads)
        self._write_lock = trio.Lock()
        self._pending: list[_PendingSave] = []
        # Touched from worker threads, hence a thread lock rather than a Trio one.
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_threads: int = DEFAULT_MAX_THREADS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> SqliteStore:
        """Open (creating if need be) the database file and its tables."""
        store = cls(
            path, max_threads=max_threads, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch
        )
        try:
            await store.init_schema()
            await trio.to_thread.run_sync(_warn_if_exposed, store.path)
        except BaseException:
            await store.aclose()
            raise
        return store

    async def init_schema(self) -> None:
        """Create the missing tables and indexes; existing ones are left as they are."""

        def work(conn: sqlite3.Connection) -> None:
            # One script in one transaction, so that two processes starting together
            # never see half a schema.
            conn.executescript(f"BEGIN IMMEDIATE;\n{_schema_sql()}\nCOMMIT;")

        async with self._write_lock:
            await self._run(work)

    async def check_schema(self) -> None:
        """Nothing to check: :meth:`open` creates the embedded store's tables itself."""

    # --- Store ---------------------------------------------------------------------

    async def find_user_by_address(self, address: str) -> User | None:
        def work(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(_FIND_USER, (_ascii_lower(address),)).fetchone()
            if row is None:
                return None
            return User(id=uuid.UUID(row[0]), email=row[1], display_name=row[2])

        return await self._run(work)

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        def work(conn: sqlite3.Connection) -> tuple[str, ...]:
            rows = conn.execute(_USER_ADDRESSES, (str(user_id),))
            return tuple(dict.fromkeys(address.lower() for address, _rank in rows))

        return await self._run(work)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(
                f'SELECT {_API_KEY_COLUMNS} FROM "SmtpApiKeys"'
                ' WHERE "UserId" = ? AND "RevokedAt" IS NULL'
                ' AND ("KeyPrefix" = ? OR "KeyPrefix" IS NULL)'
                ' ORDER BY "KeyPrefix" IS NULL, "CreatedAt", "Id"',
                (str(user_id), prefix),
            )
            return [_api_key_record(row) for row in rows]

        return await self._run(work)

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        if not last_used:
            return
        params = [(_ts(when), str(key_id)) for key_id, when in last_used.items()]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany('UPDATE "SmtpApiKeys" SET "LastUsedAt" = ? WHERE "Id" = ?', params)

        await self._write(work)

    async def save_email(self, email: NewEmail) -> SavedEmail:
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        pending = _PendingSave(email)
        self._pending.append(pending)
        try:
            async with self._write_lock:
                if pending.outcome is None:
                    await self._commit_pending()
        except BaseException:
            # Cancelled while queued: withdraw, so nothing is stored for a caller that
            # will never reply 250. Once taken into a batch the outcome stands.
            if pending in self._pending:
                self._pending.remove(pending)
            raise
        outcome = pending.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    async def _commit_pending(self) -> None:
        """Store the queued messages (the caller's first) in one transaction."""
        batch = self._pending[: self._max_batch]
        del self._pending[: len(batch)]
        try:
            # Shielded: the batch carries other callers' messages, and their outcomes
            # must be handed out even when this caller is cancelled.
            with trio.CancelScope(shield=True):
                outcomes = await self._run(
                    functools.partial(_save_batch, emails=[p.email for p in batch])
                )
        except BaseException as exc:
            error_type = type(exc) if isinstance(exc, StoreError) else StoreUnavailable
            for item in batch:
                error = error_type(str(exc))
                error.__cause__ = exc
                item.outcome = error
            raise
        for item, outcome in zip(batch, outcomes, strict=True):
            item.outcome = outcome

    async def ping(self) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute('SELECT 1 FROM "Users" LIMIT 1').fetchall()

        await self._run(work)

    def pool_stats(self) -> PoolStats:
        return PoolStats(
            active=int(self._limiter.borrowed_tokens), maximum=int(self._limiter.total_tokens)
        )

    async def aclose(self) -> None:
        """Close idle connections now; busy ones close when their call returns."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []

        def close_all() -> None:
            for conn in idle:
                conn.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_all)

    # --- AdminStore ----------------------------------------------------------------

    async def create_user(
        self, email: str, *, display_name: str | None, aliases: Collection[str]
    ) -> User:
        """A CLI-made user; raises ValueError when an address already belongs to one."""
        return await self._write(
            functools.partial(
                _create_user, email=email, display_name=display_name, aliases=tuple(aliases)
            )
        )

    async def create_api_key(
        self,
        user_id: uuid.UUID,
        *,
        name: str,
        key_hash: str,
        key_prefix: str | None,
        scopes: str,
    ) -> ApiKey:
        """Raises ValueError for an unknown user or a value too long for its column."""
        return await self._write(
            functools.partial(
                _create_api_key,
                user_id=user_id,
                name=name,
                key_hash=key_hash,
                key_prefix=key_prefix,
                scopes=scopes,
            )
        )

    async def list_api_keys(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(
                f'SELECT {_API_KEY_COLUMNS} FROM "SmtpApiKeys" WHERE "UserId" = ?'
                ' ORDER BY "CreatedAt", "Id"',
                (str(user_id),),
            )
            return [_api_key_record(row) for row in rows]

        return await self._run(work)

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        now = _ts(_now())

        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                'UPDATE "SmtpApiKeys" SET "RevokedAt" = ? WHERE "Id" = ? AND "RevokedAt" IS NULL',
                (now, str(key_id)),
            )
            return cursor.rowcount > 0

        return await self._write(work)

    async def list_emails(self, limit: int = 50) -> Sequence[StoredEmail]:
        """Most recent first, with recipients but without attachments."""
        return await self._run(
            functools.partial(_in_read_transaction, functools.partial(_list_emails, limit=limit))
        )

    async def get_email(self, email_id: uuid.UUID) -> StoredEmail | None:
        return await self._run(
            functools.partial(
                _in_read_transaction, functools.partial(_get_email, email_id=str(email_id))
            )
        )

    # --- plumbing ------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._write_lock:
            return await self._run(functools.partial(_in_write_transaction, work))

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        return await trio.to_thread.run_sync(self._call, work, limiter=self._limiter)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """In a worker thread: borrow a connection, run ``work``, give it back."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._checkout()
            return work(conn)
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc
        finally:
            if conn is not None:
                self._checkin(conn)

    def _checkout(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable("the SQLite store is closed")
            if self._idle:
                return self._idle.pop()
        return _connect(self.path, self._busy_timeout_ms)

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed and not conn.in_transaction:
                self._idle.append(conn)
                return
        conn.close()
