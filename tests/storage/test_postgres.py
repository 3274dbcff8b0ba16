"""PostgreSQL backend: schema, platform compatibility, group commit, outages.

What every store must do is in the shared contract suite; this module covers what only
the PostgreSQL store has: `db init` against existing databases, the platform's EF
schema, and behaviour while the server is down or kills connections. Its connection
strings are in ``test_connstring.py``.
"""

from __future__ import annotations

import json
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import attrs
import pytest
import trio
import trio.testing

from relate_smtp.storage import (
    SavedEmail,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)
from relate_smtp.storage.connstring import (
    DEFAULT_MAX_POOL_SIZE,
    PostgresParams,
    parse_connection_string,
)
from relate_smtp.storage.postgres import PostgresStore, batch, open_postgres_store
from relate_smtp.storage.postgres.pool import GENERIC_PLANS
from relate_smtp.storage.records import (
    RECIPIENT_BCC,
    RECIPIENT_TO,
    NewEmail,
    link_recipients,
)
from relate_smtp.storage.values import normalise_email
from tests.storage.helpers import (
    TABLES,
    PostgresTestBackend,
    TempDatabase,
    attachment,
    bcc,
    cc,
    new_email,
    open_postgres_backend,
    temporary_database,
    to,
)

F = TypeVar("F", bound=Callable[..., object])

# --- helpers for the database tests ------------------------------------------------------


def pg(test: F) -> F:
    """A test that needs the PostgreSQL server (a skip without it, a failure in CI)."""
    marked: F = pytest.mark.usefixtures("postgres_available")(pytest.mark.postgres(test))
    return marked


@pytest.fixture
async def backend(postgres_available: None) -> AsyncIterator[PostgresTestBackend]:
    async with open_postgres_backend() as opened:
        yield opened


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _columns(db: TempDatabase) -> dict[tuple[str, str], tuple[str, str]]:
    rows = await db.fetch(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = ANY($1::text[])",
        list(TABLES),
    )
    return {(r["table_name"], r["column_name"]): (r["data_type"], r["is_nullable"]) for r in rows}


async def _names(db: TempDatabase, sql: str) -> set[str]:
    return {r[0] for r in await db.fetch(sql, list(TABLES))}


_INDEXES = "SELECT indexname FROM pg_indexes WHERE tablename = ANY($1::text[])"
_CONSTRAINTS = (
    "SELECT conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
    " WHERE t.relname = ANY($1::text[]) AND c.contype IN ('p', 'f')"
)


async def _count(db: TempDatabase, table: str) -> int:
    assert table in TABLES
    return int(await db.fetchval(f'SELECT count(*) FROM "{table}"'))


def _message_to(*addresses: str, **changes: object) -> NewEmail:
    return new_email(
        header_recipients=tuple(to(a) for a in addresses),
        envelope_recipients=addresses,
        attachments=(attachment("a.bin", b"\x00\x01payload"),),
        **changes,
    )


# --- schema ------------------------------------------------------------------------------


@pg
async def test_check_schema_on_an_empty_database_names_db_init() -> None:
    async with temporary_database("empty") as db, open_postgres_store(db.params) as store:
        with pytest.raises(SchemaMissing, match="relate-smtp db init") as caught:
            await store.check_schema()
        assert '"Users"' in str(caught.value)

        # a store method on the missing tables says the same, rather than a bare SQL error
        with pytest.raises(SchemaMissing, match="relate-smtp db init"):
            await store.find_user_by_address("a@example.com")


@pg
async def test_init_schema_refuses_existing_tables_without_history_unchanged() -> None:
    """SPEC §8: tables but no "__EFMigrationsHistory" (EF would create them again) are
    reported, and nothing is created, dropped or altered."""
    async with temporary_database("empty") as db, open_postgres_store(db.params) as store:
        # An existing "Users" with a column of its own and a row in it.
        await db.execute(
            'CREATE TABLE "Users" ("Id" uuid PRIMARY KEY, "OidcSubject" varchar(500) NOT NULL,'
            ' "OidcIssuer" varchar(500) NOT NULL, "Email" varchar(320) NOT NULL,'
            ' "DisplayName" varchar(500), "CreatedAt" timestamptz NOT NULL,'
            ' "LastLoginAt" timestamptz, "Theme" text NOT NULL DEFAULT \'dark\')'
        )
        user_id = uuid.uuid4()
        await db.execute(
            'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "CreatedAt")'
            " VALUES ($1, 'sub', 'https://idp', 'kept@example.com', now())",
            user_id,
        )
        first = (await _columns(db), await _names(db, _INDEXES))

        for _ in range(2):
            with pytest.raises(SchemaMissing, match=r'changed nothing.*unexpected column "Users"'):
                await store.init_schema()

        assert (await _columns(db), await _names(db, _INDEXES)) == first
        assert await db.fetchval("SELECT to_regclass('\"Emails\"')") is None
        assert await db.fetchval('SELECT "Theme" FROM "Users" WHERE "Id" = $1', user_id) == "dark"


@pg
async def test_init_schema_matches_the_platforms_ef_schema() -> None:
    """Same columns, types, nullability, key and index names as the EF migrations make
    (the platform may have more indexes; db init adds none of its own)."""
    async with temporary_database("init") as ours, temporary_database("platform") as theirs:
        assert await _columns(ours) == await _columns(theirs)
        assert await _names(ours, _CONSTRAINTS) == await _names(theirs, _CONSTRAINTS)
        assert await _names(ours, _INDEXES) <= await _names(theirs, _INDEXES)
        assert await ours.fetchval(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = 'SmtpApiKeys' AND column_name = 'Scopes'"
        ) == await theirs.fetchval(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = 'SmtpApiKeys' AND column_name = 'Scopes'"
        )


@pg
async def test_check_schema_names_a_missing_column() -> None:
    async with temporary_database("init") as db, open_postgres_store(db.params) as store:
        await db.execute('ALTER TABLE "Emails" DROP COLUMN "ThreadId"')

        with pytest.raises(SchemaMissing, match='"Emails" lacks "ThreadId"'):
            await store.check_schema()


@pg
async def test_the_platforms_database_works_without_db_init() -> None:
    async with open_postgres_backend(schema="platform") as b:
        store, db = b.store, b.db
        await store.check_schema()
        alice = await store.create_user("Alice@Example.com", display_name="A", aliases=["a@x.org"])
        legacy_key = uuid.uuid4()
        await db.execute(
            'INSERT INTO "SmtpApiKeys" ("Id", "UserId", "Name", "KeyHash", "CreatedAt")'
            " VALUES ($1, $2, 'old', '$2a$11$h', now())",
            legacy_key,
            alice.id,
        )
        label = uuid.uuid4()
        await db.execute(
            'INSERT INTO "Labels" ("Id", "UserId", "Name", "Color", "SortOrder", "CreatedAt")'
            " VALUES ($1, $2, 'Work', '#ff0000', 0, now())",
            label,
            alice.id,
        )

        (key,) = await store.candidate_api_keys(alice.id, "rk_123456789")
        assert (key.id, key.key_prefix, key.scopes) == (legacy_key, None, "[]")
        assert await store.find_user_by_address("A@X.ORG") == alice
        saved = await store.save_email(_message_to("a@x.org"))
        assert saved.linked_user_ids == (alice.id,)
        got = await store.get_email(saved.id)
        assert got is not None and got.attachments[0].content == b"\x00\x01payload"
        assert await db.fetchval('SELECT count(*) FROM "Labels"') == 1
        assert await db.fetchval('SELECT count(*) FROM "__EFMigrationsHistory"') == 4

        await store.init_schema()  # harmless on the platform's database too
        assert await db.fetchval('SELECT count(*) FROM "Labels"') == 1


# --- queries -----------------------------------------------------------------------------


@pg
async def test_exact_and_case_insensitive_lookups_find_the_same_user(
    backend: PostgresTestBackend,
) -> None:
    store = backend.store
    bob = await store.create_user("Bob@Example.com", display_name=None, aliases=["B@Example.com"])
    await backend.raw.add_alias(bob.id, "pending@example.com", verified=False)

    for address in ("Bob@Example.com", "bob@example.com", "b@example.COM", "Pending@example.com"):
        assert await store.find_user_by_address(address) == bob
    assert await store.find_user_by_address("") is None


@pg
async def test_touch_api_keys_never_moves_last_used_backwards(
    backend: PostgresTestBackend,
) -> None:
    store = backend.store
    user = await store.create_user("k@example.com", display_name=None, aliases=())
    key = await store.create_api_key(
        user.id, name="k", key_hash="h", key_prefix="rk_000000000", scopes='["smtp"]'
    )
    later = datetime(2024, 6, 1, tzinfo=UTC)

    await store.touch_api_keys({key.id: later})
    await store.touch_api_keys({key.id: later - timedelta(hours=1), uuid.uuid4(): later})

    (got,) = await store.list_api_keys(user.id)
    assert got.last_used_at == later


@pg
async def test_save_links_threads_and_keeps_header_order(backend: PostgresTestBackend) -> None:
    store = backend.store
    alice = await store.create_user("alice@example.com", display_name=None, aliases=())
    carol = await store.create_user("carol@example.com", display_name=None, aliases=())
    parent = await store.save_email(new_email(message_id="p@example.com"))
    headers = (
        to("zed@remote.example"),
        to("alice@example.com", "Alice"),
        cc("carol@example.com"),
        bcc("yan@remote.example"),
    )
    big = bytes(range(256)) * 4096  # 1 MiB of every byte value

    saved = await store.save_email(
        new_email(
            in_reply_to="<p@example.com>",
            header_recipients=headers,
            envelope_recipients=("alice@example.com", "dave@remote.example", "CAROL@example.com"),
            attachments=(attachment("big.bin", big), attachment("b.txt", b"b", "text/plain")),
        )
    )

    assert saved == SavedEmail(
        id=saved.id, thread_id=parent.id, linked_user_ids=(alice.id, carol.id)
    )
    got = await store.get_email(saved.id)
    assert got is not None
    assert [(r.address, r.type, r.user_id) for r in got.recipients] == [
        ("zed@remote.example", RECIPIENT_TO, None),
        ("alice@example.com", RECIPIENT_TO, alice.id),
        ("carol@example.com", "Cc", carol.id),
        ("yan@remote.example", RECIPIENT_BCC, None),
    ]
    assert [a.file_name for a in got.attachments] == ["big.bin", "b.txt"]
    assert got.attachments[0].content == big
    sizes = await backend.db.fetch(
        'SELECT "SizeBytes", length("Content") AS n FROM "EmailAttachments" WHERE "EmailId" = $1',
        saved.id,
    )
    assert sorted((r["SizeBytes"], r["n"]) for r in sizes) == [(1, 1), (len(big), len(big))]
    assert await backend.db.fetchval(
        'SELECT bool_and(NOT "IsRead") FROM "EmailRecipients" WHERE "EmailId" = $1', saved.id
    )


@pytest.mark.parametrize("reply", [False, True], ids=["new", "reply"])
@pytest.mark.parametrize("files", [0, 1], ids=["no-attachment", "attachment"])
async def test_each_variant_of_the_batch_statement_stores_the_whole_message(
    backend: PostgresTestBackend, reply: bool, files: int
) -> None:
    """The batch statement leaves out the parent lookup and the attachment insert when
    no message of the batch needs them; each variant stores what it is given."""
    store = backend.store
    alice = await store.create_user("alice@example.com", display_name=None, aliases=())
    parent = await store.save_email(new_email(message_id="p@example.com"))
    message = new_email(
        header_recipients=(to("alice@example.com"),),
        envelope_recipients=("alice@example.com",),
        in_reply_to="<p@example.com>" if reply else None,
        attachments=tuple(attachment(f"{n}.bin", b"data") for n in range(files)),
    )
    sql, args = batch.statement([batch.message_rows(normalise_email(message))])
    assert ('"EmailAttachments"' in sql, len(args)) == ((True, 30) if files else (False, 24))
    assert ("LATERAL" in sql) is reply

    saved = await store.save_email(message)

    assert saved == SavedEmail(
        id=message.id, thread_id=parent.id if reply else None, linked_user_ids=(alice.id,)
    )
    got = await store.get_email(saved.id)
    assert got is not None and len(got.attachments) == files
    assert [r.user_id for r in got.recipients] == [alice.id]


# --- group commit ------------------------------------------------------------------------


Outcomes = dict[uuid.UUID, SavedEmail | BaseException]


def _saver(store: PostgresStore, outcomes: Outcomes) -> Callable[[NewEmail], Awaitable[None]]:
    async def save(email: NewEmail) -> None:
        try:
            outcomes[email.id] = await store.save_email(email)
        except StoreError as exc:
            outcomes[email.id] = exc

    return save


async def _queue_behind_a_blocked_batch(
    store: PostgresStore,
    db: TempDatabase,
    nursery: trio.Nursery,
    save: Callable[[NewEmail], Awaitable[None]],
    first: NewEmail,
    queued: Sequence[NewEmail],
) -> None:
    """Start saving ``first`` and wait until its batch is blocked in the database (the
    caller holds a lock), then queue ``queued``: they will form the next batch."""
    nursery.start_soon(save, first)
    await db.sessions_waiting_on_locks(1)
    for email in queued:
        nursery.start_soon(save, email)
    await trio.testing.wait_all_tasks_blocked()
    assert store.group_commit_stats().queued == len(queued)


@pg
async def test_concurrent_saves_share_one_connection_and_one_statement(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    alice = await store.create_user("alice@example.com", display_name=None, aliases=())
    assert store.pool_stats().maximum == db.params.max_pool_size
    first = _message_to("alice@example.com")
    emails = [_message_to("alice@example.com", "x@remote.example") for _ in range(20)]
    outcomes: Outcomes = {}
    save = _saver(store, outcomes)

    async with trio.open_nursery() as nursery, db.locked("Users", "ACCESS EXCLUSIVE"):
        for _ in range(3):
            nursery.start_soon(store.find_user_by_address, "alice@example.com")
        await _queue_behind_a_blocked_batch(store, db, nursery, save, first, emails)
        await db.sessions_waiting_on_locks(4)
        # three lookups, one committer: the 21 saves hold one connection between them
        assert store.pool_stats().active == 4
    assert store.pool_stats().active == 0

    stats = store.group_commit_stats()
    assert (stats.batches, stats.messages, stats.largest_batch) == (2, 21, 20)
    assert stats.isolated_batches == 0
    assert all(
        outcomes[e.id] == SavedEmail(id=e.id, thread_id=None, linked_user_ids=(alice.id,))
        for e in [first, *emails]
    )
    assert await _count(db, "Emails") == 21
    assert await _count(db, "EmailRecipients") == 1 + 2 * 20
    assert await _count(db, "EmailAttachments") == 21


@pg
async def test_bad_messages_fail_alone_and_the_rest_of_their_batch_is_stored(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    await store.create_user("alice@example.com", display_name=None, aliases=())
    first = _message_to("alice@example.com")
    good = [_message_to("alice@example.com", "x@remote.example") for _ in range(18)]
    no_file_name = attrs.evolve(
        _message_to("alice@example.com"),
        attachments=(attrs.evolve(attachment("x.bin", b"x"), file_name=cast(str, None)),),
    )
    earlier = await store.save_email(_message_to("alice@example.com", subject="earlier"))
    same_id = _message_to("alice@example.com", id=earlier.id, subject="duplicate")
    batch = [*good[:9], no_file_name, *good[9:], same_id]
    outcomes: Outcomes = {}

    async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
        await _queue_behind_a_blocked_batch(
            store, db, nursery, _saver(store, outcomes), first, batch
        )

    stats = store.group_commit_stats()
    assert (stats.batches, stats.largest_batch, stats.isolated_batches) == (3, 20, 1)
    for bad in (no_file_name, same_id):
        assert isinstance(outcomes[bad.id], StoreError)
        assert not isinstance(outcomes[bad.id], StoreUnavailable)  # retrying won't help
    assert isinstance(outcomes[first.id], SavedEmail)
    for email in good:
        saved = outcomes[email.id]
        assert isinstance(saved, SavedEmail) and len(saved.linked_user_ids) == 1
    assert await store.get_email(no_file_name.id) is None
    kept = await store.get_email(earlier.id)
    assert kept is not None and kept.subject == "earlier"
    assert await _count(db, "Emails") == 2 + 18
    assert await _count(db, "EmailRecipients") == 2 + 2 * 18
    assert await _count(db, "EmailAttachments") == 2 + 18


@pg
async def test_a_connection_killed_mid_batch_fails_the_whole_batch_and_the_store_recovers(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    user = await store.create_user("u@example.com", display_name=None, aliases=())
    first = _message_to("u@example.com")
    emails = [_message_to("u@example.com", "x@remote.example") for _ in range(4)]
    outcomes: Outcomes = {}

    async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
        await _queue_behind_a_blocked_batch(
            store, db, nursery, _saver(store, outcomes), first, emails
        )
        killed = await db.sessions_waiting_on_locks(1)
        assert await db.terminate(killed) == 1
        # the queued four go out as the next batch, on a new connection, and block too
        assert await db.terminate(await db.sessions_waiting_on_locks(1, besides=killed)) == 1

    assert store.group_commit_stats().largest_batch == 4
    assert all(isinstance(outcomes[e.id], StoreUnavailable) for e in [first, *emails])
    for table in ("Emails", "EmailRecipients", "EmailAttachments"):
        assert await _count(db, table) == 0

    # no restart: the next calls reconnect
    later = await store.save_email(_message_to("u@example.com"))
    assert later.linked_user_ids == (user.id,)
    await store.ping()


@pg
async def test_a_cancelled_caller_withdraws_its_message_until_it_is_in_a_batch(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    in_flight, withdrawn, kept = (_message_to("x@remote.example") for _ in range(3))
    outcomes: Outcomes = {}
    save = _saver(store, outcomes)
    scopes: list[trio.CancelScope] = []

    async def cancellable(email: NewEmail) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await save(email)

    async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
        nursery.start_soon(cancellable, in_flight)
        await db.sessions_waiting_on_locks(1)
        nursery.start_soon(cancellable, withdrawn)
        nursery.start_soon(save, kept)
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit_stats().queued == 2
        for scope in scopes:
            scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit_stats().queued == 1

    assert set(outcomes) == {kept.id}
    assert await store.get_email(withdrawn.id) is None
    # its caller gave up, but the batch it was in went ahead
    assert await store.get_email(in_flight.id) is not None
    assert await store.get_email(kept.id) is not None
    assert store.group_commit_stats().messages == 2


@pg
async def test_closing_fails_queued_saves_and_lets_the_batch_in_flight_finish() -> None:
    outcomes: Outcomes = {}
    first, *queued = (new_email() for _ in range(4))
    async with temporary_database("init") as db, open_postgres_store(db.params) as store:
        async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
            await _queue_behind_a_blocked_batch(
                store, db, nursery, _saver(store, outcomes), first, queued
            )
            nursery.start_soon(store.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert all(isinstance(outcomes[e.id], StoreUnavailable) for e in queued)
            assert first.id not in outcomes

        assert isinstance(outcomes[first.id], SavedEmail)
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.save_email(new_email())
        assert await _count(db, "Emails") == 1


@pg
async def test_linking_in_one_batch_matches_link_recipients(backend: PostgresTestBackend) -> None:
    """The batch statement applies records.link_recipients in SQL; random messages over
    primary addresses, aliases (verified or not, one shadowed by another user's primary
    address), case variants and remote addresses, all stored in one batch, must get
    exactly the rows link_recipients builds, and the threads of their parents."""
    store, db = backend.store, backend.db
    alice = await store.create_user("alice@example.com", display_name=None, aliases=["al@x.org"])
    bob = await store.create_user("Bob@Example.com", display_name=None, aliases=["b@x.org"])
    carol = await store.create_user("carol@example.com", display_name=None, aliases=())
    dave = await store.create_user("dave@example.com", display_name=None, aliases=())
    await backend.raw.add_alias(dave.id, "Carol@Example.COM", verified=True)  # carol wins
    await backend.raw.add_alias(bob.id, "pending@x.org", verified=False)
    owners = {
        "alice@example.com": alice.id,
        "al@x.org": alice.id,
        "bob@example.com": bob.id,
        "b@x.org": bob.id,
        "pending@x.org": bob.id,
        "carol@example.com": carol.id,
        "dave@example.com": dave.id,
    }
    addresses = [
        "alice@example.com",
        "ALICE@example.com",
        "al@x.org",
        "bob@example.com",
        "B@X.org",
        "carol@example.com",
        "CAROL@example.com",
        "dave@example.com",
        "pending@x.org",
        "x@remote.example",
        "y@remote.example",
    ]
    root = await store.save_email(new_email(message_id="root@example.com"))
    reply = await store.save_email(
        new_email(message_id="<re@example.com>", in_reply_to="root@example.com")
    )
    threads = {
        None: None,
        "<root@example.com>": root.id,
        "re@example.com": root.id,  # stored bracketed, threaded under root
        "<nobody@example.com>": None,
    }
    assert reply.thread_id == root.id
    rng = random.Random(4)
    makers = (to, cc, bcc)
    emails = [
        new_email(
            header_recipients=tuple(
                rng.choice(makers)(rng.choice(addresses), rng.choice([None, "Name"]))
                for _ in range(rng.randint(0, 4))
            ),
            envelope_recipients=tuple(rng.choice(addresses) for _ in range(rng.randint(0, 3))),
            in_reply_to=rng.choice(list(threads)),
        )
        for _ in range(40)
    ]
    outcomes: Outcomes = {}

    async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
        await _queue_behind_a_blocked_batch(
            store, db, nursery, _saver(store, outcomes), new_email(), emails
        )

    assert store.group_commit_stats().largest_batch == len(emails)
    for email in emails:
        rows = link_recipients(email.header_recipients, email.envelope_recipients, owners)
        linked = tuple(dict.fromkeys(r.user_id for r in rows if r.user_id is not None))
        assert outcomes[email.id] == SavedEmail(
            id=email.id, thread_id=threads[email.in_reply_to], linked_user_ids=linked
        )
        got = await store.get_email(email.id)
        assert got is not None and got.recipients == rows
        assert got.thread_id == threads[email.in_reply_to]


# --- outages -----------------------------------------------------------------------------


@pg
async def test_a_burst_of_saves_survives_connections_being_killed(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    await store.create_user("u@example.com", display_name=None, aliases=())
    total, concurrency, kill_every = 300, 20, 40
    emails = [_message_to("u@example.com", "x@remote.example") for _ in range(total)]
    outcomes: dict[uuid.UUID, SavedEmail | BaseException] = {}
    limiter = trio.Semaphore(concurrency)
    progress = trio.Condition()
    kills = 0

    async def save(email: NewEmail) -> None:
        async with limiter:
            try:
                outcomes[email.id] = await store.save_email(email)
            except StoreError as exc:
                outcomes[email.id] = exc
        async with progress:
            progress.notify_all()

    async def killer() -> None:
        nonlocal kills
        for wave in range(1, total // kill_every):
            async with progress:
                while len(outcomes) < wave * kill_every:
                    await progress.wait()
            kills += await db.terminate_connections(db.params.application_name or "")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        for email in emails:
            nursery.start_soon(save, email)

    failed = [e for e in emails if not isinstance(outcomes[e.id], SavedEmail)]
    assert kills > 0
    assert all(isinstance(outcomes[e.id], StoreUnavailable) for e in failed)
    rows = await db.fetch(
        'SELECT e."Id",'
        ' (SELECT count(*) FROM "EmailRecipients" r WHERE r."EmailId" = e."Id") AS recipients,'
        ' (SELECT count(*) FROM "EmailAttachments" a WHERE a."EmailId" = e."Id") AS files'
        ' FROM "Emails" e'
    )
    stored = {r["Id"]: (r["recipients"], r["files"]) for r in rows}
    assert len(stored) == len(rows)
    # every save that returned is there, whole; a failed one is whole or absent
    assert all(stored[e.id] == (2, 1) for e in emails if e.id not in {f.id for f in failed})
    assert all(counts == (2, 1) for counts in stored.values())
    assert (
        await db.fetchval(
            'SELECT count(*) FROM "EmailRecipients" r'
            ' WHERE NOT EXISTS (SELECT 1 FROM "Emails" e WHERE e."Id" = r."EmailId")'
        )
        == 0
    )
    await store.save_email(_message_to("u@example.com"))


@pg
async def test_a_store_opened_while_the_server_is_down_fails_fast_then_recovers() -> None:
    async with (
        temporary_database("init") as db,
        _switchable_proxy(db.params) as proxy,
        open_postgres_store(proxy.params) as store,  # opening does no I/O
    ):
        with trio.fail_after(10):
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.check_schema()
            with pytest.raises(StoreUnavailable):
                await store.save_email(new_email())
        assert store.pool_stats().active == 0

        proxy.up = True
        await store.check_schema()
        saved = await store.save_email(new_email())
        assert (await store.get_email(saved.id)) is not None

        proxy.up = False
        await db.terminate_connections(proxy.params.application_name or "")
        with trio.fail_after(10), pytest.raises(StoreUnavailable):
            await store.ping()
        proxy.up = True
        await store.ping()


async def test_a_port_nobody_listens_on_gives_store_unavailable() -> None:
    params = parse_connection_string(f"Host=127.0.0.1;Port={_free_port()};Username=x;Timeout=2")
    async with open_postgres_store(params) as store:
        with trio.fail_after(10):
            with pytest.raises(StoreUnavailable, match="PostgreSQL unavailable"):
                await store.find_user_by_address("a@example.com")
            with pytest.raises(StoreUnavailable):
                await store.save_email(new_email())
        assert store.pool_stats().maximum == DEFAULT_MAX_POOL_SIZE


async def test_a_server_that_never_answers_times_out() -> None:
    """A black-holed server (TCP accepted, nothing said) must not hang a session."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _hold_forever, 0)
        port = listeners[0].socket.getsockname()[1]
        params = parse_connection_string(f"Host=127.0.0.1;Port={port};Username=x;Timeout=1")
        async with open_postgres_store(params) as store:
            with trio.fail_after(10):
                with pytest.raises(StoreUnavailable):
                    await store.ping()
                with pytest.raises(StoreUnavailable):
                    await store.candidate_api_keys(uuid.uuid4(), "rk_000000000")
        nursery.cancel_scope.cancel()


async def _hold_forever(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@attrs.define
class _Proxy:
    params: PostgresParams
    up: bool = False


@asynccontextmanager
async def _switchable_proxy(target: PostgresParams) -> AsyncIterator[_Proxy]:
    """A TCP proxy to PostgreSQL that refuses service (closes at once) while ``up`` is
    false: a database server going away and coming back, without touching the real one."""
    proxy = _Proxy(params=target)

    async def handle(client: trio.SocketStream) -> None:
        if not proxy.up:
            await client.aclose()
            return
        server = await trio.open_tcp_stream(target.host or "127.0.0.1", target.port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await dst.aclose()

        async with server, client, trio.open_nursery() as pumps:
            pumps.start_soon(pump, client, server)
            pumps.start_soon(pump, server, client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        port = listeners[0].socket.getsockname()[1]
        proxy.params = attrs.evolve(
            target, host="127.0.0.1", port=port, connect_timeout=3.0, ssl="disable"
        )
        yield proxy
        nursery.cancel_scope.cancel()


async def test_the_group_commit_keeps_one_connection_and_replaces_a_lost_one(
    backend: PostgresTestBackend,
) -> None:
    store, db = backend.store, backend.db
    name = db.params.application_name or ""

    async def backends() -> set[int]:
        rows = await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2"
            " AND pid <> pg_backend_pid()",
            db.name,
            name,
        )
        return {r["pid"] for r in rows}

    for _ in range(3):
        await store.save_email(_message_to("x@remote.example"))
    kept = await backends()
    assert len(kept) == 1
    assert store.pool_stats().active == 0  # kept between batches, yet idle
    for _ in range(3):
        await store.save_email(_message_to("x@remote.example"))
    assert await backends() == kept  # no acquire per batch: the same backend wrote all

    assert await db.terminate_connections(name) == 1
    outcome: SavedEmail | StoreError
    try:  # the first batch may meet the dead connection: refused, never half-stored
        outcome = await store.save_email(_message_to("x@remote.example"))
    except StoreUnavailable as exc:
        outcome = exc
    saved = await store.save_email(_message_to("x@remote.example"))
    assert isinstance(saved, SavedEmail)
    replaced = await backends()
    assert len(replaced) == 1 and replaced != kept
    stored = 8 if isinstance(outcome, SavedEmail) else 7
    assert await _count(db, "Emails") == stored


async def test_the_kept_connection_goes_back_to_the_pool_after_its_idle_lifetime() -> None:
    async with temporary_database("init") as db:
        params = attrs.evolve(db.params, idle_lifetime=1)
        async with open_postgres_store(params) as store:
            await store.save_email(_message_to("x@remote.example"))
            assert store._bridge.held_idle == 1
            # Released by a timer on the store's asyncio thread one second after its last
            # batch: nothing on the Trio side to wait on, so the flag is polled.
            with trio.fail_after(10):
                while store._bridge.held_idle:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            # and taken again by the next batch
            saved = await store.save_email(_message_to("x@remote.example"))
            assert saved.linked_user_ids == ()
            assert store._bridge.held_idle == 1
            assert await _count(db, "Emails") == 2


async def test_the_kept_connection_stays_while_batches_keep_coming() -> None:
    """Connection Idle Lifetime counts from the last batch, not from the first."""
    async with temporary_database("init") as db:
        params = attrs.evolve(db.params, idle_lifetime=2)
        async with open_postgres_store(params) as store:
            await store.save_email(_message_to("x@remote.example"))
            kept = store._bridge._held
            for _ in range(5):  # 3 s of batches 0.6 s apart, longer than the idle lifetime
                await trio.sleep(0.6)
                await store.save_email(_message_to("x@remote.example"))
                assert store._bridge._held is kept
            with trio.fail_after(10):
                while store._bridge.held_idle:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert await _count(db, "Emails") == 6


# --- plans -------------------------------------------------------------------------------


def _plan_nodes(plan: dict[str, object]) -> Iterator[dict[str, object]]:
    yield plan
    for child in cast(list[dict[str, object]], plan.get("Plans", [])):
        yield from _plan_nodes(child)


@pg
async def test_the_batch_plan_made_while_emails_is_empty_never_reads_the_whole_table() -> None:
    """The store keeps one generic plan per connection, often made while the tables are
    still empty (a new deployment): planned then, the thread lookup once joined every
    stored e-mail for every batch, so each save got slower as the mailbox grew."""
    async with temporary_database("init") as db, db.session() as session:
        await session.execute(f"SET plan_cache_mode = {GENERIC_PLANS['plan_cache_mode']}")
        await session.execute(f"PREPARE save AS {batch.SAVE_BATCH}")
        # A generic plan does not depend on the values: NULL for each of the 30.
        nulls = ", ".join(["NULL"] * len(batch.statement_args([])))
        explained = await session.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE save({nulls})")
        nodes = list(_plan_nodes(json.loads(explained)[0]["Plan"]))
        scanned = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
        assert "Emails" not in scanned
        assert any(n.get("Index Name") == "IX_Emails_MessageId" for n in nodes)


@pg
async def test_the_store_keeps_generic_plans_unless_the_connection_string_says_otherwise() -> None:
    async def plan_cache_mode(store: PostgresStore) -> str:
        return cast(str, await store._bridge.call(lambda con: con.fetchval("SHOW plan_cache_mode")))

    async with temporary_database("init") as db:
        async with open_postgres_store(db.params) as store:
            assert await plan_cache_mode(store) == "force_generic_plan"
        chosen = attrs.evolve(db.params, options=(("plan_cache_mode", "auto"),))
        async with open_postgres_store(chosen) as store:
            assert await plan_cache_mode(store) == "auto"
