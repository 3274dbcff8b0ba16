"""`relate-smtp db init` against the platform's EF Core migrations (SPEC §8, §9).

Database A is the platform fixture (the four migrations as the Npgsql provider scripts
them, history rows included); database B is an empty database after the real
``relate-smtp db init`` command. Their catalogs must be equal, and stay equal when
``db init`` runs again. The other tests cover the databases ``db init`` must leave alone:
the platform's own, and one with tables but no migration history.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any
from urllib.parse import quote

import pytest
import trio

from relate_smtp.storage import SchemaMissing
from relate_smtp.storage.postgres import open_postgres_store
from tests.storage.helpers import TempDatabase, temporary_database

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("postgres_available")]

# The platform's migrations (tyevco/relate-smtp, Relate.Smtp.Infrastructure/Migrations)
# in the order EF applies them, with the EF Core version the platform ships.
MIGRATIONS = [
    ("20260131230315_InitialCreate", "10.0.2"),
    ("20260206125502_AddApiKeyPrefix", "10.0.2"),
    ("20260209000000_AddEmailVerificationToken", "10.0.2"),
    ("20260209000000_AddOutboundEmailTables", "10.0.2"),
]
MODEL_TABLES = {
    "Users",
    "Emails",
    "EmailAttachments",
    "EmailRecipients",
    "Labels",
    "PushSubscriptions",
    "SmtpApiKeys",
    "UserEmailAddresses",
    "UserPreferences",
    "EmailFilters",
    "EmailLabels",
    "OutboundEmails",
    "OutboundRecipients",
    "OutboundAttachments",
    "DeliveryLogs",
}

_TABLES = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
"""
_COLUMNS = """
SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length,
       is_nullable, column_default
FROM information_schema.columns WHERE table_schema = 'public'
"""
# NOT NULL shows up among information_schema's CHECK constraints under OID-based names,
# so constraints come from pg_constraint, with information_schema's delete rule beside.
_CONSTRAINTS = """
SELECT k.conname, t.relname AS table_name, k.contype,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY AS u(num, n)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.num
             ORDER BY u.n)::text[] AS columns,
       r.relname AS referenced_table,
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY AS u(num, n)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.num
             ORDER BY u.n)::text[] AS referenced_columns,
       rc.delete_rule, rc.update_rule, pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public'
LEFT JOIN pg_class r ON r.oid = k.confrelid
LEFT JOIN information_schema.referential_constraints rc
       ON rc.constraint_schema = 'public' AND rc.constraint_name = k.conname
WHERE k.contype IN ('p', 'f', 'u', 'c', 'x')
"""
_INDEXES = """
SELECT i.relname AS index_name, t.relname AS table_name, x.indisunique, x.indisprimary,
       ARRAY(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS u(num, n)
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = u.num
             ORDER BY u.n)::text[] AS columns,
       pg_get_expr(x.indpred, x.indrelid) AS predicate, ix.indexdef
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public'
JOIN pg_indexes ix ON ix.schemaname = 'public' AND ix.indexname = i.relname
"""
_HISTORY = (
    'SELECT "MigrationId", "ProductVersion" FROM "__EFMigrationsHistory" ORDER BY "MigrationId"'
)
_OTHER_OBJECTS = """
SELECT c.relkind::text, c.relname FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
WHERE c.relkind NOT IN ('r', 'i')
UNION ALL SELECT 'extension', extname FROM pg_extension WHERE extname <> 'plpgsql'
"""


async def catalog(db: TempDatabase) -> dict[str, Any]:
    """Everything of the schema the platform's migrations define, comparable as data."""
    history = await db.fetch(_HISTORY) if await _has_history(db) else []
    return {
        "tables": {r["table_name"] for r in await db.fetch(_TABLES)},
        "columns": _keyed(await db.fetch(_COLUMNS), "table_name", "column_name"),
        "constraints": _keyed(await db.fetch(_CONSTRAINTS), "conname"),
        "indexes": _keyed(await db.fetch(_INDEXES), "index_name"),
        "other objects": {tuple(r) for r in await db.fetch(_OTHER_OBJECTS)},
        "history": [tuple(r) for r in history],
    }


async def _has_history(db: TempDatabase) -> bool:
    return bool(await db.fetchval("SELECT to_regclass('\"__EFMigrationsHistory\"') IS NOT NULL"))


def _keyed(rows: list[Any], *key: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[k] for k in key): dict(r) for r in rows}


def assert_same_catalog(ours: dict[str, Any], platform: dict[str, Any]) -> None:
    """Section by section, so a failure names what differs."""
    for section in platform:
        assert ours[section] == platform[section], section


async def run_db_init(db: TempDatabase) -> subprocess.CompletedProcess[bytes]:
    """The real command, as an operator runs it, pointed at ``db``."""
    p = db.params
    auth = quote(p.user or "", safe="") + (f":{quote(p.password, safe='')}" if p.password else "")
    url = f"postgresql://{auth}@{p.host}:{p.port}/{quote(db.name, safe='')}"
    prefixes = ("Smtp__", "Storage__", "ConnectionStrings__", "DOTNET_", "ASPNETCORE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["ConnectionStrings__DefaultConnection"] = url
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "relate_smtp", "db", "init"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def db_init_succeeds(db: TempDatabase) -> None:
    result = await run_db_init(db)
    assert result.returncode == 0, result.stderr.decode()


async def test_db_init_makes_the_platforms_migrated_schema() -> None:
    async with (
        temporary_database("platform") as platform,
        temporary_database("empty") as ours,
    ):
        await db_init_succeeds(ours)
        expected = await catalog(platform)
        first = await catalog(ours)
        assert_same_catalog(first, expected)

        await db_init_succeeds(ours)  # a second run changes nothing
        assert_same_catalog(await catalog(ours), first)


async def test_the_fixture_is_the_platforms_model() -> None:
    """Facts read off the migrations, so the fixture and the schema file cannot share a
    mistake unnoticed."""
    async with temporary_database("platform") as db:
        found = await catalog(db)
    assert found["tables"] == MODEL_TABLES | {"__EFMigrationsHistory"}
    assert found["history"] == MIGRATIONS
    assert found["other objects"] == set()
    columns, indexes = found["columns"], found["indexes"]
    key_prefix = columns["SmtpApiKeys", "KeyPrefix"]
    assert (key_prefix["character_maximum_length"], key_prefix["ordinal_position"]) == (12, 9)
    assert columns["UserEmailAddresses", "VerificationToken"]["character_maximum_length"] == 6
    assert columns["SmtpApiKeys", "Scopes"]["column_default"] == "'[]'::character varying"
    assert columns["EmailFilters", "TimesApplied"]["column_default"] == "0"
    assert columns["Labels", "SortOrder"]["column_default"] is None
    assert columns["DeliveryLogs", "Duration"]["data_type"] == "interval"
    partial = indexes[("IX_SmtpApiKeys_KeyPrefix_RevokedAt",)]
    assert (partial["columns"], partial["predicate"]) == (
        ["KeyPrefix", "RevokedAt"],
        '("RevokedAt" IS NULL)',
    )
    assert not indexes[("IX_UserEmailAddresses_Address",)]["indisunique"]
    assert indexes[("IX_UserEmailAddresses_UserId_Address",)]["indisunique"]
    fk = found["constraints"][("FK_DeliveryLogs_OutboundRecipients_RecipientId",)]
    assert (fk["referenced_table"], fk["delete_rule"]) == ("OutboundRecipients", "SET NULL")
    assert len(found["constraints"]) == 15 + 1 + 18  # primary keys, history's, foreign keys


async def test_db_init_leaves_the_platforms_database_alone() -> None:
    async with temporary_database("platform") as db:
        await db.execute(
            'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "CreatedAt")'
            " VALUES (gen_random_uuid(), 's', 'https://idp', 'kept@example.com', now())"
        )
        before = await catalog(db)
        await db_init_succeeds(db)
        assert_same_catalog(await catalog(db), before)
        assert await db.fetchval('SELECT count(*) FROM "Users"') == 1


async def test_db_init_fills_an_empty_history_table() -> None:
    """What EF leaves when its first migration failed: no tables, an empty history."""
    async with (
        temporary_database("platform") as platform,
        temporary_database("empty") as ours,
    ):
        await ours.execute(
            'CREATE TABLE "__EFMigrationsHistory" ('
            ' "MigrationId" character varying(150) NOT NULL,'
            ' "ProductVersion" character varying(32) NOT NULL,'
            ' CONSTRAINT "PK___EFMigrationsHistory" PRIMARY KEY ("MigrationId"))'
        )
        await db_init_succeeds(ours)
        assert_same_catalog(await catalog(ours), await catalog(platform))


# The schema of relate-smtp's `db init` before it followed the migrations: the host's
# tables without history, KeyPrefix unbounded and without the index filter.
_EARLIER_DB_INIT = """
CREATE TABLE "Users" ("Id" uuid NOT NULL, "OidcSubject" character varying(500) NOT NULL,
    "OidcIssuer" character varying(500) NOT NULL, "Email" character varying(320) NOT NULL,
    "DisplayName" character varying(500), "CreatedAt" timestamp with time zone NOT NULL,
    "LastLoginAt" timestamp with time zone, CONSTRAINT "PK_Users" PRIMARY KEY ("Id"));
CREATE TABLE "SmtpApiKeys" ("Id" uuid NOT NULL, "UserId" uuid NOT NULL,
    "Name" character varying(100) NOT NULL, "KeyHash" character varying(128) NOT NULL,
    "KeyPrefix" character varying, "Scopes" character varying(500) NOT NULL DEFAULT '[]',
    "CreatedAt" timestamp with time zone NOT NULL, "LastUsedAt" timestamp with time zone,
    "RevokedAt" timestamp with time zone, CONSTRAINT "PK_SmtpApiKeys" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_SmtpApiKeys_Users_UserId" FOREIGN KEY ("UserId")
        REFERENCES "Users" ("Id") ON DELETE CASCADE);
CREATE INDEX "IX_SmtpApiKeys_KeyPrefix_RevokedAt" ON "SmtpApiKeys" ("KeyPrefix", "RevokedAt");
"""


async def test_tables_without_history_are_reported_and_left_unchanged() -> None:
    async with temporary_database("empty") as db, open_postgres_store(db.params) as store:
        await db.execute(_EARLIER_DB_INIT)
        before = await catalog(db)

        with pytest.raises(SchemaMissing) as caught:
            await store.init_schema()

        report = str(caught.value)
        assert "no migration history" in report and "changed nothing" in report
        assert 'missing table "Emails"' in report
        assert 'missing column "SmtpApiKeys"."KeyPrefix" character varying(12) NULL' in report
        assert 'unexpected column "SmtpApiKeys"."KeyPrefix" character varying NULL' in report
        assert 'WHERE ("RevokedAt" IS NULL)' in report
        assert 'missing index "IX_Users_Email" on "Users": ("Email")' in report
        assert_same_catalog(await catalog(db), before)

        result = await run_db_init(db)  # the command fails with the same report
        assert result.returncode != 0
        assert b'missing table "Emails"' in result.stderr


async def test_history_without_the_hosts_tables_is_refused_unchanged() -> None:
    async with temporary_database("platform") as db, open_postgres_store(db.params) as store:
        await db.execute('DROP TABLE "EmailAttachments"')
        before = await catalog(db)

        with pytest.raises(SchemaMissing, match=r'no "EmailAttachments" table.*changed nothing'):
            await store.init_schema()
        assert_same_catalog(await catalog(db), before)
