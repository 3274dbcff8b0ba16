"""Connection strings (SPEC §8): Npgsql keyword strings and ``postgresql://`` URLs, their
errors (which never show the password), and every keyword Npgsql 10 documents: those
asyncpg can honour are applied, the rest are named in one start-up warning. A string
copied from the original must never stop start-up."""

from __future__ import annotations

import logging
import socket
from typing import Any

import asyncpg
import pytest

from relate_smtp.storage.connstring import (
    DEFAULT_MAX_POOL_SIZE,
    PostgresParams,
    connect_arguments,
    parse_connection_string,
    redacted,
)
from relate_smtp.storage.postgres import PostgresStore, open_postgres_store
from tests.storage.helpers import new_email, temporary_database

# --------------------------------------------------------------------------- parsing

SECRET = "s3cret;pw'x"
QUOTED = "'s3cret;pw''x'"  # SECRET as a quoted Npgsql value

P = PostgresParams


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Host=db.internal;Port=5433;Database=relate;Username=relate;Password=pw",
            P(host="db.internal", port=5433, database="relate", user="relate", password="pw"),
        ),
        # keys are case-insensitive, spaces inside keys don't matter, Npgsql synonyms
        (
            "server=db;DB=relate;User Id=u;PWD=pw;SSL Mode=VerifyFull;Minimum Pool Size=2;"
            "Max Pool Size=7;Timeout=3;Command Timeout=9;Application Name=smtp-a",
            P(
                host="db",
                database="relate",
                user="u",
                password="pw",
                ssl="verify-full",
                min_pool_size=2,
                max_pool_size=7,
                connect_timeout=3.0,
                command_timeout=9.0,
                application_name="smtp-a",
            ),
        ),
        ("Host=db;UserId=u", P(host="db", user="u")),
        ("Host=db;User Name=u", P(host="db", user="u")),
        ("Host=db;User=u;SslMode=require", P(host="db", user="u", ssl="require")),
        ("Host=db;SSL Mode=Disable", P(host="db", ssl="disable")),
        ("Host=db;sslmode=verify-ca", P(host="db", ssl="verify-ca")),
        # quoting: ';' and '=' inside quotes, doubled quotes, surrounding blanks
        (
            "Host = db ; Password=\"a;b=c\"\"d\" ; Username='o''brien';",
            P(host="db", password='a;b=c"d', user="o'brien"),
        ),
        ("Host=db;Password='s3cret;pw''x'", P(host="db", password=SECRET)),
        # keys Npgsql knows: applied where asyncpg can, else accepted and named
        (
            "Host=db;Pooling=true;Include Error Detail=true;Trust Server Certificate=true;"
            "Keepalive=30;Enlist=false;Max Auto Prepare=20;Connection Idle Lifetime=60",
            P(
                host="db",
                keepalive_idle=30,
                idle_lifetime=60.0,
                ignored=("Include Error Detail", "Enlist", "Max Auto Prepare"),
            ),
        ),
        (
            "Host=db;Timeout=0;Command Timeout=0",
            P(host="db", connect_timeout=None, command_timeout=None),
        ),
        ("Host=db:6543;Database=x", P(host="db", port=6543, database="x")),
        ("Host=/var/run/postgresql", P(host="/var/run/postgresql")),
        ("Host=db;Search Path=relate,public", P(host="db", search_path="relate,public")),
        ("Host=a;Server=b", P(host="b")),  # the last of two synonyms wins, as in Npgsql
        # URLs
        (
            "postgresql://relate:p%40ss%3Bw@db.example:5434/relate_db?sslmode=require"
            "&application_name=smtp&connect_timeout=4",
            P(
                host="db.example",
                port=5434,
                user="relate",
                password="p@ss;w",
                database="relate_db",
                ssl="require",
                application_name="smtp",
                connect_timeout=4.0,
            ),
        ),
        ("postgres://u@db/relate", P(host="db", user="u", database="relate")),
        ("POSTGRESQL://[::1]:5432/x", P(host="::1", database="x")),
        (
            "postgresql:///relate?host=%2Fvar%2Frun%2Fpostgresql&user=me",
            P(host="/var/run/postgresql", database="relate", user="me"),
        ),
        (
            "postgresql://db/x?max_pool_size=50&min_pool_size=5&command_timeout=2.5",
            P(host="db", database="x", max_pool_size=50, min_pool_size=5, command_timeout=2.5),
        ),
    ],
)
def test_parse_connection_string(text: str, expected: PostgresParams) -> None:
    assert parse_connection_string(text) == expected


def test_defaults_are_npgsqls() -> None:
    params = parse_connection_string("Host=db")

    assert params.max_pool_size == DEFAULT_MAX_POOL_SIZE == 100
    assert (params.port, params.min_pool_size, params.ssl) == (5432, 0, None)
    assert (params.connect_timeout, params.command_timeout) == (15.0, 30.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (f"Database=relate;Password={QUOTED}", "Host is required"),
        (f"Host=db;Databse=relate;Password={QUOTED}", "unknown key 'Databse'"),
        (f"Host=db;Port=fifty;Password={QUOTED}", "Port must be a whole number"),
        (f"Host=db;Port=70000;Password={QUOTED}", "Port must be between 1 and 65535"),
        (f"Host=db;Password={QUOTED};SSL Mode=Sometimes", "SSL Mode must be one of"),
        ("Host=db;Password='s3cret;pw", "unterminated quoted value for 'Password'"),
        (f"Host=db;Password={QUOTED} trailing", "unexpected text after the quoted value"),
        (f"Host=db;Password={QUOTED};Min Pool Size=9;Max Pool Size=3", "exceeds Maximum"),
        (f"Host=db;Password={QUOTED};Max Pool Size=0", "Max Pool Size must be between"),
        (f"Host=db;Password={QUOTED};Timeout=-1", "Timeout must be zero or a positive"),
        (f"Host=db;Password={QUOTED};Pooling=maybe", "Pooling must be true or false"),
        (f"Host=db1,,db2;Password={QUOTED}", "empty entry"),
        (f"Host=db;Password={QUOTED};Host", "'Host' has no '=value'"),
        (f"=x;Password={QUOTED}", "no key"),
        ("mysql://u:s3cret;pw'x@db/x", "unsupported URL scheme 'mysql'"),
        ("postgresql://u:s3cret;pw'x@db:notaport/x", "host or port is malformed"),
        ("postgresql://u:s3cret;pw'x@db/x?frobnicate=1", "unknown URL parameter 'frobnicate'"),
        ("postgresql://u:s3cret;pw'x@db/x?sslmode=maybe", "sslmode must be one of"),
        ("postgresql://u:s3cret;pw'x@db/x/y", "just the database name"),
        ("postgresql://u:s3cret;pw'x@/x", "Host is required"),
    ],
)
def test_bad_connection_strings_say_what_is_wrong_without_the_password(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError, match="connection string") as caught:
        parse_connection_string(text)

    assert message in str(caught.value)
    for fragment in ("s3cret", SECRET):
        assert fragment not in str(caught.value)


def test_redacted_hides_the_password() -> None:
    params = parse_connection_string(f"Host=db;Username=u;Password={QUOTED};Database=r")

    text = redacted(params)

    assert "s3cret" not in text and "s3cret" not in repr(params)
    assert "host=db" in text and "user=u" in text and "password=***" in text


# --------------------------------------------------------------------------- Npgsql keywords

pg = pytest.mark.postgres

# Every keyword of NpgsqlConnectionStringBuilder at v10.0.0 (display names, then the
# synonyms), each with a value Npgsql accepts.
EVERY_KEYWORD = (
    "Host=db1:5433,db2;Port=5434;Database=relate;Username=relate;Password=pw;"
    "Passfile=/run/pgpass;Application Name=smtp;Enlist=false;Search Path=relate,public;"
    "Client Encoding=UTF8;Encoding=UTF8;Timezone=Europe/Paris;SSL Mode=VerifyFull;"
    "SSL Negotiation=Postgres;GSS Encryption Mode=Disable;SSL Certificate=/tls/client.crt;"
    "SSL Key=/tls/client.key;SSL Password=keypw;Root Certificate=/tls/ca.crt;"
    "Check Certificate Revocation=false;Kerberos Service Name=postgres;Include Realm=false;"
    "Persist Security Info=false;Log Parameters=false;Include Error Detail=true;"
    "Include Failed Batched Command=false;Channel Binding=Prefer;Require Auth=scram-sha-256;"
    "Pooling=true;Minimum Pool Size=1;Maximum Pool Size=50;Connection Idle Lifetime=120;"
    "Connection Pruning Interval=10;Connection Lifetime=0;Timeout=20;Command Timeout=40;"
    "Cancellation Timeout=2000;Target Session Attributes=read-write;Load Balance Hosts=true;"
    "Host Recheck Seconds=10;Keepalive=30;TCP Keepalive=true;TCP Keepalive Time=60;"
    "TCP Keepalive Interval=5;Read Buffer Size=8192;Write Buffer Size=8192;"
    "Socket Receive Buffer Size=0;Socket Send Buffer Size=0;Max Auto Prepare=10;"
    "Auto Prepare Min Usages=5;No Reset On Close=false;Replication Mode=Off;"
    "Options=-c statement_timeout=5000;Array Nullability Mode=Never;Multiplexing=false;"
    "Write Coalescing Buffer Threshold Bytes=1000;Load Table Composites=false;"
    "Server Compatibility Mode=None;Trust Server Certificate=true;"
    "Internal Command Timeout=-1"
)

SYNONYMS = (
    "Server=db;DB=relate;User Name=a;UserId=b;User Id=c;UID=d;PSW=x;PWD=y;Krbsrvname=k;"
    "Load Balance Timeout=0;MinPoolSize=0;MaxPoolSize=5;IncludeErrorDetail=true;"
    "TargetSessionAttributes=any;TcpKeepAlive=false;SslMode=Disable"
)


def test_every_npgsql_keyword_is_accepted() -> None:
    params = parse_connection_string(EVERY_KEYWORD)

    assert (params.host, params.port, params.other_hosts) == ("db1", 5433, (("db2", 5434),))
    assert (params.database, params.user, params.password) == ("relate", "relate", "pw")
    assert params.passfile == "/run/pgpass"
    assert (params.application_name, params.search_path) == ("smtp", "relate,public")
    assert params.timezone == "Europe/Paris"
    assert params.ssl == "verify-full"
    assert (params.ssl_certificate, params.ssl_key) == ("/tls/client.crt", "/tls/client.key")
    assert (params.ssl_password, params.ssl_root_certificate) == ("keypw", "/tls/ca.crt")
    assert params.ssl_direct is False
    assert params.kerberos_service_name == "postgres"
    assert (params.min_pool_size, params.max_pool_size, params.pooling) == (1, 50, True)
    assert params.idle_lifetime == 120.0
    assert (params.connect_timeout, params.command_timeout) == (20.0, 40.0)
    assert params.target_session_attrs == "read-write"
    assert params.load_balance_hosts is True
    assert params.tcp_keepalive is True
    assert (params.keepalive_idle, params.keepalive_interval) == (60, 5)
    assert params.options == (("statement_timeout", "5000"),)
    assert params.ignored == (
        "Enlist",
        "Client Encoding",
        "Encoding",
        "GSS Encryption Mode",
        "Check Certificate Revocation",
        "Include Realm",
        "Persist Security Info",
        "Log Parameters",
        "Include Error Detail",
        "Include Failed Batched Command",
        "Channel Binding",
        "Require Auth",
        "Connection Pruning Interval",
        "Connection Lifetime",
        "Cancellation Timeout",
        "Host Recheck Seconds",
        "Read Buffer Size",
        "Write Buffer Size",
        "Socket Receive Buffer Size",
        "Socket Send Buffer Size",
        "Max Auto Prepare",
        "Auto Prepare Min Usages",
        "No Reset On Close",
        "Replication Mode",
        "Array Nullability Mode",
        "Multiplexing",
        "Write Coalescing Buffer Threshold Bytes",
        "Load Table Composites",
        "Server Compatibility Mode",
        "Internal Command Timeout",
    )


def test_npgsql_synonyms_are_accepted() -> None:
    params = parse_connection_string(SYNONYMS)

    assert (params.host, params.database, params.user, params.password) == (
        "db",
        "relate",
        "d",
        "y",
    )
    assert (params.kerberos_service_name, params.max_pool_size) == ("k", 5)
    assert (params.target_session_attrs, params.ssl) == ("any", "disable")
    assert params.ignored == ("Load Balance Timeout", "IncludeErrorDetail")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("any", "any"),
        ("Primary", "primary"),
        ("standby", "standby"),
        ("prefer-primary", "any"),
        ("PreferStandby", "prefer-standby"),
        ("read-write", "read-write"),
        ("read-only", "read-only"),
    ],
)
def test_target_session_attributes_map_onto_asyncpg(value: str, expected: str) -> None:
    params = parse_connection_string(f"Host=db;Target Session Attributes={value}")
    assert params.target_session_attrs == expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("-c statement_timeout=5000", (("statement_timeout", "5000"),)),
        ("-cwork_mem=4MB --lock-timeout=1s", (("work_mem", "4MB"), ("lock_timeout", "1s"))),
        ("'-c search_path=a b'", (("search_path", "a b"),)),
    ],
)
def test_options_become_run_time_parameters(
    options: str, expected: tuple[tuple[str, str], ...]
) -> None:
    assert parse_connection_string(f'Host=db;Options="{options}"').options == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Host=db;Target Session Attributes=sometimes", "Target Session Attributes must be"),
        ("Host=db;Options=-x", "Options takes -c name=value"),
        ("Host=db;Load Balance Hosts=yes", "Load Balance Hosts must be true or false"),
        ("Host=db;SSL Negotiation=maybe", "SSL Negotiation must be Postgres or Direct"),
        ("Host=db;Keepalive=-1", "Keepalive must be at least 0"),
        ("Host=db;Databse=relate", "unknown key 'Databse'"),
    ],
)
def test_bad_values_of_known_keywords_still_stop_start_up(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_connection_string(text)


def test_several_hosts_with_ports() -> None:
    params = parse_connection_string("Host=a:6000,[::1]:6001,b,/tmp;Port=6002")

    assert (params.host, params.port) == ("a", 6000)
    assert params.other_hosts == (("::1", 6001), ("b", 6002), ("/tmp", 6002))
    args = connect_arguments(params)
    assert args["host"] == ["a", "::1", "b", "/tmp"]
    assert args["port"] == [6000, 6001, 6002, 6002]


def test_url_with_several_hosts() -> None:
    params = parse_connection_string("postgresql://u@a,b/relate?target_session_attrs=primary")
    assert (params.host, params.other_hosts) == ("a", (("b", 5432),))
    assert params.target_session_attrs == "primary"


def test_tls_files_go_to_asyncpg_as_libpq_parameters() -> None:
    params = parse_connection_string(
        "Host=db;SSL Mode=Require;Root Certificate=/ca.crt;SSL Certificate=/c.crt;"
        "SSL Key=/c.key;SSL Password=k&y;SSL Negotiation=Direct;Passfile=/pgpass;"
        "Kerberos Service Name=pg;Target Session Attributes=primary;Timezone=UTC;"
        "Options=-c statement_timeout=1000;Search Path=relate"
    )

    args = connect_arguments(params)

    assert args["ssl"] is None
    assert args["dsn"] == (
        "postgresql://?sslrootcert=%2Fca.crt&sslcert=%2Fc.crt&sslkey=%2Fc.key"
        "&sslpassword=k%26y&sslmode=require"
    )
    assert args["direct_tls"] is True
    assert (args["passfile"], args["krbsrvname"]) == ("/pgpass", "pg")
    assert args["target_session_attrs"] == "primary"
    assert args["server_settings"] == {
        "statement_timeout": "1000",
        "application_name": "relate-smtp",
        "search_path": "relate",
        "TimeZone": "UTC",
    }


def test_without_tls_files_the_mode_is_passed_as_is() -> None:
    args = connect_arguments(parse_connection_string("Host=db;SSL Mode=Prefer"))
    assert (args["ssl"], "dsn" in args, "direct_tls" in args) == ("prefer", False, False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _run_sql(store: PostgresStore, sql: str) -> Any:
    async def op(con: asyncpg.Connection) -> Any:
        return await con.fetchval(sql)

    return await store._bridge.call(op)


@pg
async def test_a_string_with_many_keywords_connects(caplog: pytest.LogCaptureFixture) -> None:
    """Failover past a dead host, run-time parameters applied, Npgsql-only keywords
    named once, mail stored."""
    caplog.set_level(logging.WARNING)
    async with temporary_database("init") as db:
        real: PostgresParams = db.params
        text = (
            f"Host=127.0.0.1:{_closed_port()},{real.host}:{real.port};"
            f"Database={real.database};Username={real.user or 'postgres'};"
            f"Password={real.password or ''};SSL Mode=Disable;Trust Server Certificate=true;"
            "Target Session Attributes=primary;Multiplexing=false;Include Error Detail=true;"
            "Max Auto Prepare=10;Options=-c statement_timeout=4321;Timezone=Asia/Tokyo;"
            "Keepalive=30;TCP Keepalive=true;TCP Keepalive Interval=5;Pooling=false;"
            "Connection Idle Lifetime=60;Application Name=relate-keywords;Timeout=5;"
            "Load Balance Hosts=false;Minimum Pool Size=0;Maximum Pool Size=3"
        )
        async with open_postgres_store(text) as store:
            saved = await store.save_email(new_email())
            assert (await store.get_email(saved.id)) is not None
            assert await _run_sql(store, "SHOW statement_timeout") == "4321ms"
            assert await _run_sql(store, "SHOW TimeZone") == "Asia/Tokyo"
            assert await _run_sql(store, "SHOW application_name") == "relate-keywords"
    warnings = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert warnings == [
        "ConnectionStrings:DefaultConnection: Multiplexing, Include Error Detail, "
        "Max Auto Prepare accepted but has no effect here (Npgsql-only settings)"
    ]


@pg
async def test_load_balanced_hosts_connect() -> None:
    async with temporary_database("init") as db:
        real: PostgresParams = db.params
        text = (
            f"Host={real.host}:{real.port},localhost:{real.port};Database={real.database};"
            f"Username={real.user or 'postgres'};Load Balance Hosts=true;TCP Keepalive=true"
        )
        async with open_postgres_store(text) as store:
            for _ in range(3):
                await store.save_email(new_email())
            assert len(await store.list_emails(10)) == 3
