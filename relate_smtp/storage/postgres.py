"""The PostgreSQL store: the platform's own database, through asyncpg, bridged into Trio.

asyncpg is an asyncio library; the server is Trio. :func:`open_postgres_store` runs one
trio-asyncio loop for the store's lifetime and every public method of
:class:`PostgresStore` is a plain Trio async function that hops into that loop for the
database work and back, so no other module imports asyncio or trio-asyncio.

Availability (SPEC §10): the pool is created with no connection opened (asyncpg's
``init_size=0``), so the server starts while PostgreSQL is down. Each call acquires a
connection, and asyncpg reconnects a pool slot whose connection was lost, so the store
recovers by itself when the database returns. Every transient failure (refused or timed
out connection, a connection dropped mid-query, the server shutting down, too many
connections, serialization failure) surfaces as :class:`StoreUnavailable`; anything else
is a bug or a schema mismatch and is not disguised as one.

Group commit (SPEC §5): the bridge is the expensive part. trio-asyncio's emulated loop
costs about a millisecond of CPU per message when every save crosses into asyncio on
its own (0.4x the throughput of plain asyncio), so :meth:`PostgresStore.save_email`
only queues the message and waits. One committer task takes everything queued,
crosses into asyncio once, and stores the whole batch with ONE statement
(:data:`_SAVE_BATCH`: CTEs over ``unnest`` arrays that resolve the recipients' users
and the threads and insert every row), which PostgreSQL commits atomically with one
WAL flush; then every caller gets its own outcome, so no 250 goes out before its
message is committed. If the database refuses a batch for something one message may
have caused, the committer stores its messages one by one, so a bad message fails
alone; a lost connection fails the whole batch with :class:`StoreUnavailable` and,
the batch being one statement, leaves nothing partial.

Queries and EF's indexes: the platform's ``IX_Users_Email`` is a plain index on
``"Email"``, not on ``lower("Email")``, and ``IX_UserEmailAddresses_Address`` is a plain
index on ``"Address"``. Matching must be case-insensitive (SPEC §3, §4), so a single-address
lookup first tries the exact spelling (served by ``IX_Users_Email``, the common case for
addresses typed the way they were registered) and only falls back to ``lower()`` scans
when that finds nothing; PostgreSQL's Append node stops at the first branch that
yields a row under ``LIMIT 1``. The batch statement compares ``lower()`` directly,
once per batch. Neither query needs an index the platform does not create; an operator
with a large ``"Users"`` table can add ``CREATE INDEX ON "Users" (lower("Email"))`` and
both queries use it unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, NoReturn, TypeVar

import asyncpg
import attrs
import trio
import trio_asyncio

from relate_smtp.storage import (
    ApiKey,
    Attachment,
    NewEmail,
    PoolStats,
    RecipientRow,
    SavedEmail,
    SchemaMissing,
    ServerConnections,
    StoredEmail,
    StoreError,
    StoreUnavailable,
    User,
)
from relate_smtp.storage.connstring import (
    PostgresParams,
    connect_arguments,
    parse_connection_string,
)
from relate_smtp.storage.records import (
    CONTENT_TYPE_MAX,
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    FILE_NAME_MAX,
    IN_REPLY_TO_MAX,
    KEY_NAME_MAX,
    MESSAGE_ID_MAX,
    RECIPIENT_BCC,
    RECIPIENT_TYPE_MAX,
    REFERENCES_MAX,
    SCOPES_MAX,
    SUBJECT_MAX,
)

__all__ = ["CLI_OIDC_ISSUER", "GroupCommitStats", "PostgresStore", "open_postgres_store"]

T = TypeVar("T")

log = logging.getLogger(__name__)

CLI_OIDC_ISSUER: Final = "relate-smtp-cli"  # SPEC §9: users made by `relate-smtp users add`
PING_TIMEOUT: Final = 5.0  # SPEC §7: the database health check fails after 5 s
CLOSE_TIMEOUT: Final = 5.0  # graceful pool close before connections are cut
_SERVER_CONNECTIONS: Final = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())::int,
       (SELECT setting::int FROM pg_settings WHERE name = 'max_connections')
"""
# Group commit bounds. Twenty-odd concurrent deliveries fit in one batch; the byte cap
# keeps one statement's encoded arguments (and a failed batch's retry) small.
MAX_BATCH: Final = 64
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024

# The tables and columns this host reads or writes: what check_schema() demands.
REQUIRED_COLUMNS: Final[Mapping[str, frozenset[str]]] = {
    "Users": frozenset(
        {"Id", "OidcSubject", "OidcIssuer", "Email", "DisplayName", "CreatedAt", "LastLoginAt"}
    ),
    "UserEmailAddresses": frozenset({"Id", "UserId", "Address", "IsVerified", "AddedAt"}),
    "SmtpApiKeys": frozenset(
        {
            "Id",
            "UserId",
            "Name",
            "KeyHash",
            "KeyPrefix",
            "Scopes",
            "CreatedAt",
            "LastUsedAt",
            "RevokedAt",
        }
    ),
    "Emails": frozenset(
        {
            "Id",
            "MessageId",
            "FromAddress",
            "FromDisplayName",
            "Subject",
            "TextBody",
            "HtmlBody",
            "ReceivedAt",
            "SizeBytes",
            "InReplyTo",
            "References",
            "ThreadId",
            "SentByUserId",
        }
    ),
    "EmailRecipients": frozenset(
        {"Id", "EmailId", "Address", "DisplayName", "Type", "UserId", "IsRead"}
    ),
    "EmailAttachments": frozenset(
        {"Id", "EmailId", "FileName", "ContentType", "SizeBytes", "Content"}
    ),
}

# SQLSTATE classes that mean "try again later": 08 connection exception, 53 insufficient
# resources, 57 operator intervention (admin shutdown, cannot connect now, statement
# timeout), 58 system error, 40 transaction rollback (serialization, deadlock),
# 3D database does not exist yet, 28 authentication (a password being rotated). A bad
# password is also a configuration error, but answering 4xx and reporting Unhealthy is
# the right outcome for both.
_TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57", "58", "40", "3D", "28"})
_TRANSIENT_SQLSTATES: Final = frozenset({"55P03"})  # lock_not_available

# --- SQL ---------------------------------------------------------------------------------

_USER_COLUMNS = 'u."Id", u."Email", u."DisplayName"'

# Exact spelling first (uses IX_Users_Email), then case-insensitive, then additional
# addresses verified or not (SPEC §4: the platform adds them unverified and cannot verify
# them; the original's GetByEmailAsync ignores IsVerified). An address several users list
# belongs to the lowest user id, as in _SAVE_BATCH's `owner`.
_FIND_USER = f"""
(SELECT {_USER_COLUMNS} FROM "Users" u WHERE u."Email" = $1 LIMIT 1)
UNION ALL
(SELECT {_USER_COLUMNS} FROM "Users" u WHERE lower(u."Email") = lower($1) LIMIT 1)
UNION ALL
(SELECT {_USER_COLUMNS} FROM "UserEmailAddresses" a JOIN "Users" u ON u."Id" = a."UserId"
 WHERE lower(a."Address") = lower($1) ORDER BY u."Id" LIMIT 1)
LIMIT 1
"""

# The user's primary address, then each additional address that belongs to them: not
# another user's primary (SPEC §4) nor listed by a user with a lower id (_FIND_USER).
_USER_ADDRESSES = """
SELECT 0 AS rank, lower("Email") AS address, NULL::timestamptz AS added, "Id" AS id
FROM "Users" WHERE "Id" = $1
UNION ALL
SELECT 1, lower(a."Address"), a."AddedAt", a."Id"
FROM "UserEmailAddresses" a WHERE a."UserId" = $1
AND NOT EXISTS (SELECT 1 FROM "Users" o
    WHERE o."Id" <> $1 AND lower(o."Email") = lower(a."Address"))
AND NOT EXISTS (SELECT 1 FROM "UserEmailAddresses" o
    WHERE o."UserId" < $1 AND lower(o."Address") = lower(a."Address"))
ORDER BY rank, added, id
"""

_KEY_COLUMNS = (
    '"Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes", "CreatedAt", '
    '"LastUsedAt", "RevokedAt"'
)

_CANDIDATE_KEYS = f"""
SELECT {_KEY_COLUMNS} FROM "SmtpApiKeys"
WHERE "UserId" = $1 AND "RevokedAt" IS NULL AND ("KeyPrefix" = $2 OR "KeyPrefix" IS NULL)
ORDER BY ("KeyPrefix" IS NULL), "CreatedAt" DESC
"""

# Several hosts may touch one key: never move LastUsedAt backwards.
_TOUCH_KEYS = """
UPDATE "SmtpApiKeys" AS k SET "LastUsedAt" = v.used
FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, used)
WHERE k."Id" = v.id AND (k."LastUsedAt" IS NULL OR k."LastUsedAt" < v.used)
"""

# Every address of the given list (primary rank 0 beats alias rank 1) and, when $2/$3
# are given, the thread parent (rank 2): what `create_user` checks before inserting.
_RESOLVE_FOR_SAVE = """
SELECT 0 AS rank, lower(u."Email") AS address, u."Id" AS id
FROM "Users" u WHERE lower(u."Email") = ANY($1::text[])
UNION ALL
SELECT 1, lower(a."Address"), a."UserId"
FROM "UserEmailAddresses" a WHERE lower(a."Address") = ANY($1::text[])
UNION ALL
(SELECT 2, NULL, COALESCE(e."ThreadId", e."Id") FROM "Emails" e
 WHERE e."MessageId" IN ($2, $3) ORDER BY e."ReceivedAt", e."Id" LIMIT 1)
"""

# A whole group-commit batch in ONE statement, which PostgreSQL commits or rolls back as
# a whole: one round trip and one WAL flush however many messages and rows it carries.
# Under READ COMMITTED a separate lookup first would add a round trip and no guarantee.
#
# It resolves the batch's addresses to users (`owner`: primary rank 0 beats an
# additional address, verified or not, rank 1; ties go to the lowest user id) and each
# reply's thread (`thread`: the parent is the earliest message stored with that
# Message-ID, compared bare and bracketed because MimeKit stored it
# bare and other writers did not), then applies `records.link_recipients` in SQL:
#   - `env`: each user the envelope names, once, with the first envelope address naming
#     them (envelope ids are time-ordered, so `ORDER BY v.id` is envelope order);
#   - a header row is linked only when it is the first header row naming its user
#     (`nth = 1`) and that user is in `env`;
#   - every `env` user no header row names gets a Bcc row, under the id pre-assigned
#     to that envelope position. All header ids precede all envelope ids of a message,
#     so `ORDER BY "Id"` reads header rows in order, then Bcc rows in envelope order.
# The statement sees the database as it was before the batch, as two concurrent
# transactions would: a reply whose parent is in the same batch is not threaded under
# it. Foreign keys are checked at the end of the statement, when the Emails rows
# inserted by `email` are visible. The result is one row per stored message: its thread and its
# linked users in row order.
_SAVE_BATCH = f"""
WITH msg AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::timestamptz[], $9::bigint[], $10::text[], $11::text[],
        $12::uuid[], $13::text[])
    AS m(id, message_id, from_address, from_display_name, subject, text_body, html_body,
        received_at, size_bytes, in_reply_to, refs, sent_by, parent)
), hdr_in AS (
    SELECT * FROM unnest($14::uuid[], $15::uuid[], $16::text[], $17::text[], $18::text[],
        $19::text[])
    AS h(email_id, id, key, address, display_name, type)
), env_in AS (
    SELECT * FROM unnest($20::uuid[], $21::uuid[], $22::text[], $23::text[])
    AS v(email_id, id, key, address)
), found AS (
    SELECT 0 AS rank, lower(u."Email") AS key, u."Id" AS user_id
    FROM "Users" u WHERE lower(u."Email") = ANY($24::text[])
    UNION ALL
    SELECT 1, lower(a."Address"), a."UserId"
    FROM "UserEmailAddresses" a WHERE lower(a."Address") = ANY($24::text[])
), owner AS (
    SELECT DISTINCT ON (key) key, user_id FROM found ORDER BY key, rank, user_id
), thread AS (
    SELECT DISTINCT ON (p.parent) p.parent, COALESCE(e."ThreadId", e."Id") AS thread_id
    FROM (SELECT DISTINCT parent FROM msg WHERE parent IS NOT NULL) AS p
    JOIN "Emails" e ON e."MessageId" IN (p.parent, '<' || p.parent || '>')
    ORDER BY p.parent, e."ReceivedAt", e."Id"
), env AS (
    SELECT DISTINCT ON (v.email_id, o.user_id) v.email_id, v.id, v.address, o.user_id
    FROM env_in v JOIN owner o ON o.key = v.key
    ORDER BY v.email_id, o.user_id, v.id
), hdr AS (
    SELECT h.*, o.user_id AS candidate,
        row_number() OVER (PARTITION BY h.email_id, o.user_id ORDER BY h.id) AS nth
    FROM hdr_in h LEFT JOIN owner o ON o.key = h.key
), email AS (
    INSERT INTO "Emails" ("Id", "MessageId", "FromAddress", "FromDisplayName", "Subject",
        "TextBody", "HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References",
        "ThreadId", "SentByUserId")
    SELECT m.id, m.message_id, m.from_address, m.from_display_name, m.subject, m.text_body,
        m.html_body, m.received_at, m.size_bytes, m.in_reply_to, m.refs, t.thread_id,
        m.sent_by
    FROM msg m LEFT JOIN thread t ON t.parent = m.parent
    RETURNING "Id", "ThreadId"
), recipient AS (
    INSERT INTO "EmailRecipients" ("Id", "EmailId", "Address", "DisplayName", "Type",
        "UserId", "IsRead")
    SELECT h.id, h.email_id, h.address, h.display_name, h.type,
        CASE WHEN h.nth = 1 AND EXISTS (
            SELECT 1 FROM env WHERE env.email_id = h.email_id AND env.user_id = h.candidate
        ) THEN h.candidate END,
        false
    FROM hdr h
    UNION ALL
    SELECT v.id, v.email_id, v.address, NULL, '{RECIPIENT_BCC}', v.user_id, false
    FROM env v
    WHERE NOT EXISTS (
        SELECT 1 FROM hdr h WHERE h.email_id = v.email_id AND h.candidate = v.user_id
    )
    RETURNING "Id", "EmailId", "UserId"
), attachment AS (
    INSERT INTO "EmailAttachments" ("Id", "EmailId", "FileName", "ContentType", "SizeBytes",
        "Content")
    SELECT * FROM unnest($25::uuid[], $26::uuid[], $27::text[], $28::text[], $29::bigint[],
        $30::bytea[])
)
SELECT e."Id" AS id, e."ThreadId" AS thread_id,
    ARRAY(SELECT r."UserId" FROM recipient r WHERE r."EmailId" = e."Id"
        AND r."UserId" IS NOT NULL ORDER BY r."Id") AS linked
FROM email e
"""

_EMAIL_COLUMNS = (
    '"Id", "MessageId", "FromAddress", "FromDisplayName", "Subject", "TextBody", '
    '"HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References", "ThreadId", '
    '"SentByUserId"'
)

_RECIPIENTS_OF = """
SELECT "EmailId", "Address", "DisplayName", "Type", "UserId" FROM "EmailRecipients"
WHERE "EmailId" = ANY($1::uuid[]) ORDER BY "EmailId", "Id"
"""

_SCHEMA_COLUMNS = """
SELECT c.relname, a.attname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND c.relname = ANY($1::text[])
  AND pg_catalog.pg_table_is_visible(c.oid)
"""

# Serialises concurrent `db init` runs (several hosts starting at once): both would
# otherwise find the database empty and the second fail on the first one's tables.
_INIT_LOCK = "SELECT pg_advisory_xact_lock(hashtext('relate-smtp db init'))"


def _schema_sql() -> str:
    return resources.files("relate_smtp.storage").joinpath("schema/postgres.sql").read_text()


# `db init` (SPEC §8): the platform's EF model, its migration history, and how a database
# that is neither empty nor the platform's is reported.
_HISTORY: Final = "__EFMigrationsHistory"
_HISTORY_ROWS: Final = 'SELECT "MigrationId" FROM "__EFMigrationsHistory" ORDER BY "MigrationId"'
# Relations an unqualified name resolves to, as the script's statements would see them.
_VISIBLE: Final = """
SELECT name FROM unnest($1::text[]) AS name
WHERE pg_catalog.to_regclass(pg_catalog.quote_ident(name)) IS NOT NULL
"""
_CURRENT_NAMESPACE: Final = (
    "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = pg_catalog.current_schema()"
)
# One line per column, constraint and index of the named tables in one namespace, free
# of schema names and OIDs so that two namespaces compare line by line.
_SCHEMA_FACTS: Final = """
WITH t AS (
    SELECT c.oid, c.relname FROM pg_catalog.pg_class c
    WHERE c.relnamespace = $1 AND c.relkind IN ('r', 'p') AND c.relname = ANY($2::text[])
),
col AS (
    SELECT a.attrelid, a.attnum, format('%I', a.attname) AS name
    FROM pg_catalog.pg_attribute a
    WHERE a.attnum > 0 AND NOT a.attisdropped
)
SELECT t.relname, format('table %I', t.relname) AS fact FROM t
UNION ALL
SELECT t.relname, format(
    'column %I.%s %s%s%s', t.relname, c.name,
    pg_catalog.format_type(a.atttypid, a.atttypmod),
    CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END,
    COALESCE(' DEFAULT ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid), ''))
FROM t
JOIN col c ON c.attrelid = t.oid
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.attrelid AND a.attnum = c.attnum
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
UNION ALL
SELECT t.relname, format(
    'constraint %I on %I: %s (%s)%s', k.conname, t.relname,
    CASE k.contype
        WHEN 'p' THEN 'PRIMARY KEY' WHEN 'f' THEN 'FOREIGN KEY' WHEN 'u' THEN 'UNIQUE'
        ELSE 'CHECK ' || pg_catalog.pg_get_expr(k.conbin, k.conrelid)
    END,
    (SELECT string_agg(c.name, ', ' ORDER BY u.n)
     FROM unnest(k.conkey) WITH ORDINALITY AS u(num, n)
     JOIN col c ON c.attrelid = k.conrelid AND c.attnum = u.num),
    CASE WHEN k.contype = 'f' THEN format(
        ' REFERENCES %I (%s) ON DELETE %s', r.relname,
        (SELECT string_agg(c.name, ', ' ORDER BY u.n)
         FROM unnest(k.confkey) WITH ORDINALITY AS u(num, n)
         JOIN col c ON c.attrelid = k.confrelid AND c.attnum = u.num),
        CASE k.confdeltype
            WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'd' THEN 'SET DEFAULT'
            WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION'
        END)
    ELSE '' END)
FROM t
JOIN pg_catalog.pg_constraint k ON k.conrelid = t.oid AND k.contype IN ('p', 'f', 'u', 'c')
LEFT JOIN pg_catalog.pg_class r ON r.oid = k.confrelid
UNION ALL
SELECT t.relname, format(
    'index %I on %I: %s(%s)%s', i.relname, t.relname,
    CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END,
    (SELECT string_agg(c.name, ', ' ORDER BY u.n)
     FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS u(num, n)
     JOIN col c ON c.attrelid = x.indrelid AND c.attnum = u.num),
    COALESCE(' WHERE ' || pg_catalog.pg_get_expr(x.indpred, x.indrelid), ''))
FROM t
JOIN pg_catalog.pg_index x ON x.indrelid = t.oid
JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
WHERE NOT EXISTS (  -- a key's own index is reported as the key
    SELECT 1 FROM pg_catalog.pg_constraint k
    WHERE k.conindid = x.indexrelid AND k.contype IN ('p', 'u', 'x')
)
"""
_Facts = set[tuple[str, str]]


async def _host_columns(con: asyncpg.Connection) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in await con.fetch(_SCHEMA_COLUMNS, list(REQUIRED_COLUMNS)):
        found.setdefault(row["relname"], set()).add(row["attname"])
    return found


def _host_schema_problem(found: Mapping[str, set[str]]) -> str | None:
    """What the host's tables lack, or None."""
    missing_tables = [t for t in REQUIRED_COLUMNS if t not in found]
    if missing_tables:
        return "the database has no " + ", ".join(f'"{t}"' for t in missing_tables) + " table(s)"
    problems = [
        f'"{table}" lacks ' + ", ".join(f'"{c}"' for c in sorted(columns - found[table]))
        for table, columns in REQUIRED_COLUMNS.items()
        if columns - found[table]
    ]
    if problems:
        return "the Relate tables do not match what relate-smtp expects: " + "; ".join(problems)
    return None


async def _require_host_schema(con: asyncpg.Connection, applied: Sequence[str]) -> None:
    """On the platform's database, refuse (changing nothing) when the host's tables or
    columns are absent: only the platform's migrations may add them."""
    problem = _host_schema_problem(await _host_columns(con))
    if problem is not None:
        raise SchemaMissing(
            f'{problem}, though "{_HISTORY}" lists {len(applied)} migration(s): the '
            "platform's migrations manage this database and `relate-smtp db init` changed "
            "nothing; migrate it with the platform"
        )


def _model_tables(script: str) -> list[str]:
    """The platform's tables, in the order the migrations create them."""
    return re.findall(r'^CREATE TABLE "(\w+)"', script, re.MULTILINE)


def _model_migrations(script: str) -> list[str]:
    """The migration ids the script records in the history, in EF's order."""
    return re.findall(r"^VALUES \('(\w+)', '[^']*'\);", script, re.MULTILINE)


async def _visible(con: asyncpg.Connection, names: Sequence[str]) -> list[str]:
    return [row["name"] for row in await con.fetch(_VISIBLE, list(names))]


async def _applied_migrations(con: asyncpg.Connection) -> list[str] | None:
    """The history's migration ids, or None without a history table. Reading it holds
    ACCESS SHARE until commit: the platform's migrator (which locks the table ACCESS
    EXCLUSIVE) cannot start in between, and one already running is waited for."""
    if not await _visible(con, [_HISTORY]):
        return None
    return [row["MigrationId"] for row in await con.fetch(_HISTORY_ROWS)]


async def _facts(con: asyncpg.Connection, namespace: int, tables: Sequence[str]) -> _Facts:
    return {
        (row["relname"], row["fact"])
        for row in await con.fetch(_SCHEMA_FACTS, namespace, list(tables))
    }


async def _expected_facts(
    con: asyncpg.Connection, script: str, tables: Sequence[str]
) -> _Facts | None:
    """The catalog the script makes, built among this session's temporary tables (no
    privilege beyond TEMP needed) inside a savepoint that is rolled back; None when the
    server does not allow it."""
    try:
        async with con.transaction():
            await con.execute("SET LOCAL search_path = pg_temp")
            await con.execute(script)
            namespace = await con.fetchval("SELECT pg_catalog.pg_my_temp_schema()")
            facts = await _facts(con, namespace, tables)
            raise _Discard(facts)
    except _Discard as discarded:
        return discarded.facts
    except asyncpg.PostgresError as exc:
        log.debug("cannot build the platform's schema for comparison: %s", exc)
        return None


class _Discard(Exception):
    """Leaves a savepoint by rollback, carrying what was learnt inside it."""

    def __init__(self, facts: _Facts) -> None:
        super().__init__("rolled back on purpose")
        self.facts = facts


def _differences(expected: _Facts, actual: _Facts) -> list[str]:
    """What the database lacks or has on top, table by table (a missing table once)."""
    present = {table for table, _ in actual}
    lines = [f'missing table "{t}"' for t in sorted({t for t, _ in expected} - present)]
    lines += [f"missing {fact}" for t, fact in sorted(expected - actual) if t in present]
    lines += [f"unexpected {fact}" for _, fact in sorted(actual - expected)]
    return lines


async def _report_unmanaged(
    con: asyncpg.Connection, script: str, present: Sequence[str]
) -> NoReturn:
    """Tables of the model but no migration history: EF would try to create them again,
    so say what differs from the platform's schema and change nothing."""
    tables = _model_tables(script)
    actual = await _facts(con, await con.fetchval(_CURRENT_NAMESPACE), tables)
    expected = await _expected_facts(con, script, tables)
    if expected is None:
        detail = ["present: " + ", ".join(f'"{t}"' for t in present)]
    else:
        detail = _differences(expected, actual) or [
            "no differences in tables, columns, constraints or indexes"
        ]
    raise SchemaMissing(
        f"the database has {len(present)} of the platform's {len(tables)} tables but no "
        f'migration history ("{_HISTORY}" missing or empty), so the platform\'s EF '
        "migrations would fail on it; `relate-smtp db init` changed nothing (bring the "
        "tables to the platform's schema with its history rows, or start from an empty "
        "database). "
        "Compared with the platform's schema: " + "; ".join(detail)
    )


# --- helpers -----------------------------------------------------------------------------


class _TimeOrderedIds:
    """UUIDv7 (RFC 9562) ids, monotonic within the process.

    Child rows get time-ordered ids so that ``ORDER BY "Id"`` returns recipients and
    attachments in the order they were inserted (header order), as EF Core's Npgsql
    provider does with its sequential GUIDs; random v4 ids would shuffle them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self) -> uuid.UUID:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                self._last_ms = ms
                self._counter = secrets.randbits(11)  # leave room to count up
            else:
                self._counter += 1
                if self._counter > 0xFFF:  # 12-bit rand_a exhausted: borrow the next ms
                    self._last_ms += 1
                    self._counter = 0
            ms, counter = self._last_ms, self._counter
        value = (ms & 0xFFFF_FFFF_FFFF) << 80
        value |= 0x7 << 76
        value |= counter << 64
        value |= 0b10 << 62
        value |= secrets.randbits(62)
        return uuid.UUID(int=value)


_new_id = _TimeOrderedIds()


def _clip(value: str, limit: int) -> str:
    """Defence in depth for SPEC §5's "truncate, never fail"; records arrive clipped."""
    return value if len(value) <= limit else value[:limit]


def _clip_opt(value: str | None, limit: int) -> str | None:
    return None if value is None else _clip(value, limit)


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _clean_text(value: str | None) -> str | None:
    """PostgreSQL refuses NUL in text and asyncpg cannot encode lone surrogates.

    The message handler already cleans text (SPEC §5); this keeps a stray character from
    turning into a 451 retried forever. The common ASCII case costs two C-level scans.
    """
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def _bare_message_id(value: str | None) -> str | None:
    """``In-Reply-To`` as MimeKit stored Message-IDs: no brackets, no blanks; ``<>`` is
    no id at all."""
    if value is None:
        return None
    bare = value.strip().removeprefix("<").removesuffix(">").strip()
    return bare or None


def _utc(value: datetime) -> datetime:
    """timestamptz needs an instant: a naive datetime is taken as UTC, never local time."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _is_transient(exc: BaseException) -> bool:
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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["Id"],
        user_id=row["UserId"],
        name=row["Name"],
        key_hash=row["KeyHash"],
        key_prefix=row["KeyPrefix"],
        scopes=row["Scopes"],
        created_at=row["CreatedAt"],
        last_used_at=row["LastUsedAt"],
        revoked_at=row["RevokedAt"],
    )


def _recipient(row: asyncpg.Record) -> RecipientRow:
    return RecipientRow(
        address=row["Address"],
        display_name=row["DisplayName"],
        type=row["Type"],
        user_id=row["UserId"],
    )


def _stored_email(
    row: asyncpg.Record,
    recipients: tuple[RecipientRow, ...],
    attachments: tuple[Attachment, ...],
) -> StoredEmail:
    return StoredEmail(
        id=row["Id"],
        message_id=row["MessageId"],
        from_address=row["FromAddress"],
        from_display_name=row["FromDisplayName"],
        subject=row["Subject"],
        text_body=row["TextBody"],
        html_body=row["HtmlBody"],
        received_at=row["ReceivedAt"],
        size_bytes=row["SizeBytes"],
        in_reply_to=row["InReplyTo"],
        references=row["References"],
        thread_id=row["ThreadId"],
        sent_by_user_id=row["SentByUserId"],
        recipients=recipients,
        attachments=attachments,
    )


def _create_pool(params: PostgresParams) -> asyncpg.Pool:
    """Build the pool object without connecting (awaiting it connects ``init_size``)."""
    sizes: dict[str, int] = {"min_size": params.min_pool_size, "max_size": params.max_pool_size}
    options = inspect.signature(asyncpg.create_pool).parameters
    extra: dict[str, Any] = {
        "max_inactive_connection_lifetime": params.idle_lifetime,
        # Pooling=false: Npgsql closes the physical connection on every close.
        "max_queries": 50000 if params.pooling else 1,
    }
    if params.tcp_keepalive or params.keepalive_idle or params.keepalive_interval:
        extra["init"] = functools.partial(_set_keepalive, params)
    if params.load_balance_hosts and params.other_hosts:
        extra["connect"] = _connect_to_a_random_host_first
    if "reset" in options:
        extra["reset"] = _keep_session
    if "init_size" in options:
        sizes["init_size"] = 0  # asyncpg ≥ 0.32: keep min_size, refill it in the background
    else:  # older asyncpg would connect min_size at creation and fail while PG is down
        sizes["min_size"] = 0
    return asyncpg.create_pool(
        **connect_arguments(params),
        timeout=params.connect_timeout if params.connect_timeout is not None else 3600.0,
        command_timeout=params.command_timeout,
        **sizes,
        **extra,
    )


async def _set_keepalive(params: PostgresParams, con: asyncpg.Connection) -> None:
    """Keepalive / TCP Keepalive*: TCP probes on each new connection, so a peer that
    vanished (a failed-over primary, a dropped NAT entry) is noticed while idle."""
    transport = getattr(con, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    tunables = (
        (getattr(socket, "TCP_KEEPIDLE", None), params.keepalive_idle),
        (getattr(socket, "TCP_KEEPINTVL", None), params.keepalive_interval),
    )
    for option, seconds in tunables:
        if option is not None and seconds:
            sock.setsockopt(socket.IPPROTO_TCP, option, seconds)


async def _connect_to_a_random_host_first(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """Load Balance Hosts=true: each new connection tries the hosts in a random order."""
    hosts = list(zip(kwargs["host"], kwargs["port"], strict=True))
    secrets.SystemRandom().shuffle(hosts)
    kwargs["host"], kwargs["port"] = [h for h, _ in hosts], [p for _, p in hosts]
    return await asyncpg.connect(*args, **kwargs)


async def _keep_session(con: asyncpg.Connection) -> None:
    """Pool reset on release: nothing beyond asyncpg's own rollback of an unfinished
    transaction.

    asyncpg's default runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release, a round trip per call. The store never changes session
    state (no SET, LISTEN, cursors or session-level advisory locks; ``db init`` takes
    a transaction-level lock), so there is nothing to undo.
    """


# --- the store ---------------------------------------------------------------------------


@attrs.define
class _Sent:
    """Whether a batch statement left for the server (so it may have committed)."""

    statement: bool = False


@attrs.define(eq=False)
class _PendingSave:
    """One caller's message waiting for the group commit, and then its outcome."""

    email: NewEmail
    rows: _MessageRows
    taken: bool = False  # in a batch: no longer withdrawn when its caller is cancelled
    outcome: SavedEmail | Exception | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    def finish(self, outcome: SavedEmail | Exception) -> None:
        self.outcome = outcome
        self.done.set()


@attrs.define
class GroupCommitStats:
    """How the group commit has gone: batches sent, messages in them, the largest
    batch, batches refused and retried message by message, and messages queued now."""

    batches: int = 0
    messages: int = 0
    largest_batch: int = 0
    isolated_batches: int = 0
    queued: int = 0


class PostgresStore:
    """:class:`~relate_smtp.storage.AdminStore` on PostgreSQL.

    Made by :func:`open_postgres_store`, which owns the trio-asyncio loop the methods
    run in; the methods may be called from any Trio task while that context is open.
    """

    def __init__(
        self,
        params: PostgresParams,
        *,
        loop: asyncio.AbstractEventLoop,
        pool: asyncpg.Pool,
    ) -> None:
        self._params = params
        self._loop = loop
        self._pool = pool
        self._closed = False
        self._acquire_timeout = params.connect_timeout
        # Group commit: save_email queues, the committer (started by _store_on) drains.
        self._queue: list[_PendingSave] = []
        self._wakeup = trio.Event()
        self._committer_scope: trio.CancelScope | None = None
        self._committer_done = trio.Event()
        self._stats = GroupCommitStats()

    # -- the bridge --

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the asyncio coroutine function ``fn(*args)`` on the store's loop."""
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)
        return result

    async def _with_connection(
        self, op: Callable[[asyncpg.Connection], Awaitable[T]], budget: float | None = None
    ) -> T:
        """asyncio side: run ``op`` on a pooled connection, mapping transient failures.

        ``budget`` (seconds) bounds the whole call: acquiring, connecting and querying.
        """
        try:
            async with (
                asyncio.timeout(budget),
                self._pool.acquire(timeout=self._acquire_timeout) as con,
            ):
                return await op(con)
        except Exception as exc:
            mapped = _as_store_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    # -- Store --

    async def find_user_by_address(self, address: str) -> User | None:
        async def op(con: asyncpg.Connection) -> User | None:
            row = await con.fetchrow(_FIND_USER, address)
            if row is None:
                return None
            return User(id=row["Id"], email=row["Email"], display_name=row["DisplayName"])

        return await self._run(self._with_connection, op)

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        async def op(con: asyncpg.Connection) -> tuple[str, ...]:
            rows = await con.fetch(_USER_ADDRESSES, user_id)
            return tuple(dict.fromkeys(row["address"] for row in rows))

        return await self._run(self._with_connection, op)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        async def op(con: asyncpg.Connection) -> Sequence[ApiKey]:
            rows = await con.fetch(_CANDIDATE_KEYS, user_id, prefix)
            return [_api_key(row) for row in rows]

        return await self._run(self._with_connection, op)

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        if not last_used:
            return
        ids = list(last_used)
        times = [_utc(last_used[key_id]) for key_id in ids]

        async def op(con: asyncpg.Connection) -> None:
            await con.execute(_TOUCH_KEYS, ids, times)

        await self._run(self._with_connection, op)

    async def save_email(self, email: NewEmail) -> SavedEmail:
        """Store the message through the group commit; return once it is committed.

        The message joins the queue the committer drains. A caller cancelled while its
        message is still queued withdraws it, so nothing is stored for a message that
        will never get its 250; once the message is in a batch the batch goes ahead.
        """
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        pending = _PendingSave(email=email, rows=_message_rows(email))
        self._queue.append(pending)
        self._wakeup.set()
        try:
            await pending.done.wait()
        except BaseException:
            if not pending.taken:
                self._queue.remove(pending)
            raise
        outcome = pending.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    def group_commit_stats(self) -> GroupCommitStats:
        """Counters of the group commit so far (a snapshot)."""
        return attrs.evolve(self._stats, queued=len(self._queue))

    async def _run_committer(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The one committer: take every queued message, store them as one batch with
        one statement, hand each caller its outcome; until the store closes.

        One committer is enough: a batch costs one round trip and one WAL flush whatever
        its size, and messages arriving meanwhile make the next batch bigger. A second
        committer would cost CPU in the emulated asyncio loop and add no throughput.
        """
        try:
            with trio.CancelScope() as self._committer_scope:
                task_status.started()
                while True:
                    while not self._queue:
                        if self._closed:
                            return
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                    await self._commit(self._take_batch())
        finally:
            self._committer_done.set()

    def _take_batch(self) -> list[_PendingSave]:
        """The oldest queued messages, up to MAX_BATCH of them or MAX_BATCH_BYTES of
        message (at least one): a bounded statement, and a bounded retry when a batch
        fails for one message's sake."""
        size = 0
        count = 0
        for pending in self._queue:
            size += pending.email.size_bytes
            if count == MAX_BATCH or (count and size > MAX_BATCH_BYTES):
                break
            count += 1
        batch = self._queue[:count]
        del self._queue[:count]
        for pending in batch:
            pending.taken = True
        return batch

    async def _commit(self, batch: Sequence[_PendingSave]) -> None:
        rows = [pending.rows for pending in batch]
        outcomes: Sequence[SavedEmail | Exception]
        sent = _Sent()
        try:
            outcomes = await self._run(
                self._with_connection, functools.partial(self._save_batch, batch=rows, sent=sent)
            )
        except Exception as exc:
            if not isinstance(exc, StoreError):
                log.error("group commit failed", exc_info=exc)
            outcomes = [_copy_error(exc) for _ in batch]
            if sent.statement and isinstance(exc, StoreUnavailable):
                outcomes = await self._recover_outcomes(batch, outcomes)
        except BaseException:
            # Cancelled: the store is closing. The statement may or may not have
            # committed; a temporary failure makes the senders retry.
            for pending in batch:
                pending.finish(StoreUnavailable("the PostgreSQL store closed mid-commit"))
            raise
        self._stats.batches += 1
        self._stats.messages += len(batch)
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.finish(outcome)

    async def _recover_outcomes(
        self, batch: Sequence[_PendingSave], outcomes: Sequence[SavedEmail | Exception]
    ) -> Sequence[SavedEmail | Exception]:
        """After a lost connection, ask again which messages of the batch are stored.

        The statement may have committed with only its answer lost; the e-mails' ids
        are known, so a message found stored is reported saved (its sender gets 250
        rather than a 451 that would make it send the message a second time). When the
        database cannot be asked either, the failures stand.
        """
        ids = [pending.email.id for pending in batch]
        try:
            found = await self._run(
                self._with_connection, functools.partial(_find_saved, ids=ids), PING_TIMEOUT
            )
        except StoreError:
            return outcomes
        if found:
            log.warning(
                "connection lost after PostgreSQL stored %d of %d messages; reporting "
                "those as saved",
                len(found),
                len(batch),
            )
        return [found.get(i, outcome) for i, outcome in zip(ids, outcomes, strict=True)]

    async def _save_batch(
        self, con: asyncpg.Connection, batch: Sequence[_MessageRows], sent: _Sent
    ) -> list[SavedEmail | Exception]:
        """asyncio side: the batch in one statement; when the database refuses it for
        something one message may have caused, each message again on its own, so a bad
        message fails alone. Nothing is stored partially either way: each statement is
        atomic."""
        sent.statement = True
        try:
            return await _store_batch(con, batch)
        except Exception as exc:
            if len(batch) == 1 or _fails_every_message(exc):
                raise
            log.info(
                "batch of %d refused (%s); storing its messages one by one",
                len(batch),
                _describe(exc),
            )
        self._stats.isolated_batches += 1
        outcomes: list[SavedEmail | Exception] = []
        for rows in batch:
            try:
                outcomes += await _store_batch(con, [rows])
            except Exception as exc:
                outcomes.append(_as_store_error(exc))
        return outcomes

    async def ping(self) -> None:
        async def op(con: asyncpg.Connection) -> None:
            await con.fetchval("SELECT 1", timeout=PING_TIMEOUT)

        await self._run(self._with_connection, op, PING_TIMEOUT)

    async def server_connections(self) -> ServerConnections:
        """The original's connection-pool query: sessions of every host on this database."""

        async def op(con: asyncpg.Connection) -> ServerConnections:
            row = await con.fetchrow(_SERVER_CONNECTIONS, timeout=PING_TIMEOUT)
            return ServerConnections(active=row[0], maximum=row[1])

        return await self._run(self._with_connection, op, PING_TIMEOUT)

    def pool_stats(self) -> PoolStats:
        size = self._pool.get_size()
        idle = self._pool.get_idle_size()
        return PoolStats(active=max(size - idle, 0), maximum=self._pool.get_max_size())

    async def aclose(self) -> None:
        """Stop the group commit, then close the pool.

        Queued messages fail with :class:`StoreUnavailable` (their senders retry); the
        batch in flight gets CLOSE_TIMEOUT to finish. Then the pool waits as long for
        connections in use and cuts them.
        """
        if self._closed:
            return
        self._closed = True

        async def close() -> None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._pool.terminate()

        with trio.CancelScope(shield=True):
            queued, self._queue[:] = list(self._queue), []
            for pending in queued:
                pending.finish(StoreUnavailable("the PostgreSQL store is closing"))
            self._wakeup.set()
            if self._committer_scope is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._committer_done.wait()
                self._committer_scope.cancel()
                await self._committer_done.wait()
            await trio_asyncio.aio_as_trio(close, loop=self._loop)()

    # -- schema --

    async def check_schema(self) -> None:
        """Raise :class:`SchemaMissing` when a Relate table or column this host uses is
        absent (the server calls this at start-up), :class:`StoreUnavailable` when the
        database cannot be reached."""
        found = await self._run(self._with_connection, _host_columns)
        problem = _host_schema_problem(found)
        if problem is None:
            return
        if any(t not in found for t in REQUIRED_COLUMNS):
            raise SchemaMissing(f"{problem}; run `relate-smtp db init` to create the Relate tables")
        raise SchemaMissing(
            f"{problem} (`relate-smtp db init` never alters existing tables; "
            "migrate the database with the platform)"
        )

    async def init_schema(self) -> None:
        """Leave the database as the platform's EF migrations would (``relate-smtp db
        init``, SPEC §8).

        With no table of the platform's model and no migration rows, run the script: every
        table, index and history row, in one transaction. With migration rows, the
        platform's migrations own the database: change nothing, and refuse if the host's
        tables or columns are absent. With tables but no rows, EF would try to create
        them again: change nothing and report what differs. Serialised across hosts by
        an advisory lock, and with the platform's migrator through the history table.
        """
        script = _schema_sql()

        async def op(con: asyncpg.Connection) -> list[str]:
            async with con.transaction():
                await con.execute(_INIT_LOCK)
                applied = await _applied_migrations(con)
                if applied:
                    await _require_host_schema(con, applied)
                    return applied
                present = await _visible(con, _model_tables(script))
                if present:
                    await _report_unmanaged(con, script, present)
                await con.execute(script)
                return []

        applied = await self._run(self._with_connection, op)
        if not applied:
            log.info("created the platform's schema and its migration history")
            return
        pending = [m for m in _model_migrations(script) if m not in applied]
        log.info(
            "the platform's migrations manage this database (%d applied); nothing changed",
            len(applied),
        )
        if pending:
            log.warning(
                "the database lacks the platform migrations %s; the platform applies them"
                " when it migrates",
                ", ".join(pending),
            )

    # -- AdminStore --

    async def create_user(
        self, email: str, *, display_name: str | None, aliases: Collection[str]
    ) -> User:
        """Raises :class:`ValueError` when the address (or an alias) already belongs to
        a user: mail for it would otherwise be delivered ambiguously."""
        user_id = uuid.uuid4()
        now = datetime.now(UTC)
        email = _clip(email, EMAIL_ADDRESS_MAX)
        display_name = _clip_opt(display_name, DISPLAY_NAME_MAX)
        # One row per distinct address, compared case-insensitively like every lookup.
        distinct = {email.lower(): email}
        for alias in aliases:
            distinct.setdefault(_clip(alias, EMAIL_ADDRESS_MAX).lower(), alias)
        alias_list = list(distinct.values())[1:]
        everyone = list(distinct)

        async def op(con: asyncpg.Connection) -> User:
            async with con.transaction():
                taken = await con.fetch(_RESOLVE_FOR_SAVE, everyone, None, None)
                if taken:
                    raise ValueError(f"address {taken[0]['address']} already belongs to a user")
                await con.execute(
                    'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", '
                    '"DisplayName", "CreatedAt") VALUES ($1, $2, $3, $4, $5, $6)',
                    user_id,
                    str(user_id),
                    CLI_OIDC_ISSUER,
                    email,
                    display_name,
                    now,
                )
                if alias_list:
                    await con.execute(
                        'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", '
                        '"IsVerified", "AddedAt") '
                        "SELECT a.id, $1, a.address, true, $2 "
                        "FROM unnest($3::uuid[], $4::text[]) AS a(id, address)",
                        user_id,
                        now,
                        [_new_id() for _ in alias_list],
                        alias_list,
                    )
            return User(id=user_id, email=email, display_name=display_name)

        return await self._run(self._with_connection, op)

    async def create_api_key(
        self,
        user_id: uuid.UUID,
        *,
        name: str,
        key_hash: str,
        key_prefix: str | None,
        scopes: str,
    ) -> ApiKey:
        """Raises :class:`ValueError` when no user has ``user_id``."""
        key = ApiKey(
            id=uuid.uuid4(),
            user_id=user_id,
            name=_clip(name, KEY_NAME_MAX),
            key_hash=key_hash,
            key_prefix=key_prefix,
            scopes=_clip(scopes, SCOPES_MAX),
            created_at=datetime.now(UTC),
        )

        async def op(con: asyncpg.Connection) -> None:
            try:
                await con.execute(
                    'INSERT INTO "SmtpApiKeys" ("Id", "UserId", "Name", "KeyHash", '
                    '"KeyPrefix", "Scopes", "CreatedAt") VALUES ($1, $2, $3, $4, $5, $6, $7)',
                    key.id,
                    key.user_id,
                    key.name,
                    key.key_hash,
                    key.key_prefix,
                    key.scopes,
                    key.created_at,
                )
            except asyncpg.ForeignKeyViolationError:
                raise ValueError(f"no user with id {user_id}") from None

        await self._run(self._with_connection, op)
        return key

    async def list_api_keys(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        async def op(con: asyncpg.Connection) -> Sequence[ApiKey]:
            rows = await con.fetch(
                f'SELECT {_KEY_COLUMNS} FROM "SmtpApiKeys" WHERE "UserId" = $1 '
                'ORDER BY "CreatedAt", "Id"',
                user_id,
            )
            return [_api_key(row) for row in rows]

        return await self._run(self._with_connection, op)

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        async def op(con: asyncpg.Connection) -> bool:
            status = await con.execute(
                'UPDATE "SmtpApiKeys" SET "RevokedAt" = $2 WHERE "Id" = $1 AND "RevokedAt" IS NULL',
                key_id,
                datetime.now(UTC),
            )
            return bool(status == "UPDATE 1")

        return await self._run(self._with_connection, op)

    async def list_emails(self, limit: int = 50) -> Sequence[StoredEmail]:
        async def op(con: asyncpg.Connection) -> Sequence[StoredEmail]:
            rows = await con.fetch(
                f'SELECT {_EMAIL_COLUMNS} FROM "Emails" '
                'ORDER BY "ReceivedAt" DESC, "Id" DESC LIMIT $1',
                max(limit, 0),
            )
            ids = [row["Id"] for row in rows]
            recipients: dict[uuid.UUID, list[RecipientRow]] = {}
            if ids:
                for r in await con.fetch(_RECIPIENTS_OF, ids):
                    recipients.setdefault(r["EmailId"], []).append(_recipient(r))
            return [_stored_email(row, tuple(recipients.get(row["Id"], ())), ()) for row in rows]

        return await self._run(self._with_connection, op)

    async def get_email(self, email_id: uuid.UUID) -> StoredEmail | None:
        async def op(con: asyncpg.Connection) -> StoredEmail | None:
            async with con.transaction(readonly=True, isolation="repeatable_read"):
                row = await con.fetchrow(
                    f'SELECT {_EMAIL_COLUMNS} FROM "Emails" WHERE "Id" = $1', email_id
                )
                if row is None:
                    return None
                recipients = await con.fetch(_RECIPIENTS_OF, [email_id])
                attachments = await con.fetch(
                    'SELECT "FileName", "ContentType", "Content" FROM "EmailAttachments" '
                    'WHERE "EmailId" = $1 ORDER BY "Id"',
                    email_id,
                )
            return _stored_email(
                row,
                tuple(_recipient(r) for r in recipients),
                tuple(
                    Attachment(
                        file_name=a["FileName"],
                        content_type=a["ContentType"],
                        content=bytes(a["Content"]),
                    )
                    for a in attachments
                ),
            )

        return await self._run(self._with_connection, op)


@attrs.frozen
class _MessageRows:
    """One message's share of :data:`_SAVE_BATCH`'s arrays, clipped and cleaned.

    A missing required value stays ``None`` so the database refuses the message (a
    :class:`StoreError`) rather than storing a made-up one.
    """

    email: tuple[object, ...]
    headers: tuple[tuple[object, ...], ...]
    envelope: tuple[tuple[object, ...], ...]
    attachments: tuple[tuple[object, ...], ...]
    keys: frozenset[str]


def _message_rows(email: NewEmail) -> _MessageRows:
    # Ids are drawn header rows first, then envelope positions, so that a Bcc row (which
    # takes its envelope position's id) sorts after every header row.
    headers = tuple(
        (
            email.id,
            _new_id(),
            r.address.lower(),
            _clip(r.address, EMAIL_ADDRESS_MAX),
            _clip_opt(_clean_text(r.display_name), DISPLAY_NAME_MAX),
            _clip(r.type, RECIPIENT_TYPE_MAX),
        )
        for r in email.header_recipients
    )
    envelope = tuple(
        (email.id, _new_id(), address.lower(), _clip(address, EMAIL_ADDRESS_MAX))
        for address in email.envelope_recipients
    )
    attachments = tuple(
        (
            _new_id(),
            email.id,
            _clip_opt(_clean_text(a.file_name), FILE_NAME_MAX),
            _clip_opt(a.content_type, CONTENT_TYPE_MAX),
            a.size_bytes,
            a.content,
        )
        for a in email.attachments
    )
    return _MessageRows(
        email=(
            email.id,
            _clip_opt(email.message_id, MESSAGE_ID_MAX),
            _clip_opt(email.from_address, EMAIL_ADDRESS_MAX),
            _clip_opt(_clean_text(email.from_display_name), DISPLAY_NAME_MAX),
            _clip_opt(_clean_text(email.subject), SUBJECT_MAX),
            _clean_text(email.text_body),
            _clean_text(email.html_body),
            _utc(email.received_at),
            email.size_bytes,
            _clip_opt(email.in_reply_to, IN_REPLY_TO_MAX),
            _clip_opt(email.references, REFERENCES_MAX),
            email.sent_by_user_id,
            _bare_message_id(email.in_reply_to),
        ),
        headers=headers,
        envelope=envelope,
        attachments=attachments,
        keys=frozenset(h[2] for h in headers) | frozenset(v[2] for v in envelope),
    )


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to the column arrays ``unnest`` takes (``width`` columns even when empty)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _batch_args(batch: Sequence[_MessageRows]) -> list[object]:
    """The 30 parameters of :data:`_SAVE_BATCH`."""
    keys: set[str] = set()
    for rows in batch:
        keys |= rows.keys
    return [
        *_columns([rows.email for rows in batch], 13),
        *_columns([h for rows in batch for h in rows.headers], 6),
        *_columns([v for rows in batch for v in rows.envelope], 4),
        list(keys),
        *_columns([a for rows in batch for a in rows.attachments], 6),
    ]


async def _store_batch(
    con: asyncpg.Connection, batch: Sequence[_MessageRows]
) -> list[SavedEmail | Exception]:
    """asyncio side: store ``batch`` with one statement (all or nothing)."""
    result = {
        row["id"]: SavedEmail(
            id=row["id"], thread_id=row["thread_id"], linked_user_ids=tuple(row["linked"])
        )
        for row in await con.fetch(_SAVE_BATCH, *_batch_args(batch))
    }
    return [result[rows.email[0]] for rows in batch]


_FIND_SAVED = """
SELECT e."Id" AS id, e."ThreadId" AS thread_id,
       coalesce(array_agg(DISTINCT r."UserId") FILTER (WHERE r."UserId" IS NOT NULL),
                '{}'::uuid[]) AS linked
FROM "Emails" e LEFT JOIN "EmailRecipients" r ON r."EmailId" = e."Id"
WHERE e."Id" = ANY($1::uuid[])
GROUP BY e."Id", e."ThreadId"
"""


async def _find_saved(
    con: asyncpg.Connection, *, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, SavedEmail]:
    """asyncio side: the messages among ``ids`` that are stored, as saves report them."""
    return {
        row["id"]: SavedEmail(
            id=row["id"], thread_id=row["thread_id"], linked_user_ids=tuple(row["linked"])
        )
        for row in await con.fetch(_FIND_SAVED, list(ids))
    }


def _as_store_error(exc: Exception) -> Exception:
    """What a caller sees for ``exc``: StoreUnavailable when worth retrying, SchemaMissing
    for absent tables, StoreError when the database refused; anything else is a bug and
    stays itself."""
    if isinstance(exc, StoreError):
        return exc
    mapped: Exception
    if isinstance(exc, asyncpg.UndefinedTableError):
        mapped = SchemaMissing(f"{exc}: the Relate tables are missing; run `relate-smtp db init`")
    elif _is_transient(exc):
        mapped = StoreUnavailable(f"PostgreSQL unavailable: {_describe(exc)}")
    elif isinstance(exc, asyncpg.PostgresError | asyncpg.DataError):
        # The database refused the statement (a constraint, a value it cannot take): a
        # permanent failure of this call, which rolled back.
        mapped = StoreError(f"PostgreSQL refused the operation: {_describe(exc)}")
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


def _fails_every_message(exc: Exception) -> bool:
    """A batch failure that retrying its messages one by one cannot cure: the
    connection or the server (transient), or the schema."""
    return _is_transient(exc) or isinstance(
        exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError
    )


def _copy_error(exc: Exception) -> Exception:
    """One exception per caller: an exception object raised in several tasks at once
    would have its traceback rewritten by each."""
    copy = type(exc)(str(exc)) if isinstance(exc, StoreError) else StoreError(_describe(exc))
    copy.__cause__ = exc
    return copy


@asynccontextmanager
async def open_postgres_store(
    connection: PostgresParams | str,
) -> AsyncIterator[PostgresStore]:
    """Open the PostgreSQL store for the duration of the ``async with`` block.

    ``connection`` is parsed parameters or ``ConnectionStrings:DefaultConnection`` itself
    (a bad string raises :class:`ValueError` before anything is opened).

    Runs the process's trio-asyncio loop for that duration (or joins the one already
    open in this task, so the loop is never doubled) and the store's group-commit task,
    creates the connection pool without connecting, and closes them all on exit. Never
    raises because the database is down: calls raise :class:`StoreUnavailable` until it
    is back. Call :meth:`PostgresStore.check_schema` at start-up to refuse a database
    without tables.

    Methods may be called from any Trio task while the block is open, including tasks
    of nurseries opened outside it; they must not be called after it exits.
    """
    params = parse_connection_string(connection) if isinstance(connection, str) else connection
    if params.ignored:
        log.warning(
            "ConnectionStrings:DefaultConnection: %s accepted but has no effect here "
            "(Npgsql-only settings)",
            ", ".join(params.ignored),
        )
    existing = trio_asyncio.current_loop.get()
    if existing is not None:
        async with _store_on(existing, params) as store:
            yield store
        return
    async with trio_asyncio.open_loop() as loop, _store_on(loop, params) as store:
        yield store


@asynccontextmanager
async def _store_on(
    loop: asyncio.AbstractEventLoop, params: PostgresParams
) -> AsyncIterator[PostgresStore]:
    async def create() -> asyncpg.Pool:
        pool = _create_pool(params)
        await pool  # init_size=0: sets up the slots, opens no connection
        return pool

    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_log_loop_error)
    try:
        pool = await trio_asyncio.aio_as_trio(create, loop=loop)()
        store = PostgresStore(params, loop=loop, pool=pool)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store._run_committer)
                try:
                    yield store
                finally:
                    await store.aclose()
        finally:
            await store.aclose()  # when starting the committer failed
    finally:
        loop.set_exception_handler(previous_handler)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what asyncio reports about orphaned futures and tasks instead of raising it.

    trio-asyncio's default handler re-raises such reports inside the loop's nursery,
    which would end the loop and with it the server. asyncpg leaves some behind when a
    connection dies during its TLS negotiation or while being reset for the pool — the
    very outages the store must outlive — and the call that suffered it has already
    raised :class:`StoreUnavailable`.
    """
    exc = context.get("exception")
    log.warning(
        "PostgreSQL driver: %s%s",
        context.get("message") or "unhandled error",
        f" ({_describe(exc)})" if exc is not None else "",
    )
