"""The PostgreSQL schema: what the host needs (``check_schema``, at start-up) and
``relate-smtp db init`` (SPEC §8), which leaves an empty database as the platform's EF
migrations would and otherwise changes nothing, saying why."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Final, NoReturn

import asyncpg

from relate_smtp.storage.errors import SchemaMissing
from relate_smtp.storage.postgres.bridge import Bridge

__all__ = ["REQUIRED_COLUMNS", "check_schema", "init_schema"]

log = logging.getLogger("relate_smtp.storage.postgres")

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


async def check_schema(bridge: Bridge) -> None:
    """Raise :class:`SchemaMissing` when a Relate table or column this host uses is
    absent (the server calls this at start-up), :class:`StoreUnavailable` when the
    database cannot be reached."""
    found = await bridge.call(_host_columns)
    problem = _host_schema_problem(found)
    if problem is None:
        return
    if any(t not in found for t in REQUIRED_COLUMNS):
        raise SchemaMissing(f"{problem}; run `relate-smtp db init` to create the Relate tables")
    raise SchemaMissing(
        f"{problem} (`relate-smtp db init` never alters existing tables; "
        "migrate the database with the platform)"
    )


async def init_schema(bridge: Bridge) -> None:
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

    applied = await bridge.call(op)
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
