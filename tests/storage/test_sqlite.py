"""What only the embedded SQLite store does: the file, its format, group commit, locks."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from relate_smtp.storage import NewEmail, SavedEmail, StoreError, StoreUnavailable
from relate_smtp.storage.sqlite import SqliteStore, saving
from tests.storage.helpers import attachment, new_email, to

Outcome = SavedEmail | Exception


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "relate-smtp.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.aclose()


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process's write transaction, holding the database's write lock."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


class BatchGate:
    """Holds each group-commit batch at the door of its transaction until allowed in.

    ``entered`` tells the test when each batch has arrived and which messages (by id,
    the leader's first) it holds.
    """

    def __init__(self) -> None:
        self._send, self.entered = trio.open_memory_channel[list[uuid.UUID]](64)
        self._permits = threading.Semaphore(0)
        self._save_batch = saving.save_batch

    def allow(self) -> None:
        self._permits.release()

    def __call__(self, conn: sqlite3.Connection, emails: Sequence[NewEmail]) -> list[Outcome]:
        trio.from_thread.run_sync(self._send.send_nowait, [email.id for email in emails])
        if not self._permits.acquire(timeout=30):
            raise RuntimeError("the test never let this batch in")
        return self._save_batch(conn, emails)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> BatchGate:
    gate = BatchGate()
    monkeypatch.setattr(saving, "save_batch", gate)
    return gate


def saver(store: SqliteStore, outcomes: dict[uuid.UUID, Outcome]) -> Callable[[NewEmail], Any]:
    async def save(email: NewEmail) -> None:
        try:
            outcomes[email.id] = await store.save_email(email)
        except StoreError as exc:
            outcomes[email.id] = exc

    return save


async def test_open_creates_the_file_and_the_tables(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await store.aclose()

    tables = {
        name for (name,) in query(db_path, "SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert tables >= {
        "Users",
        "UserEmailAddresses",
        "SmtpApiKeys",
        "Emails",
        "EmailRecipients",
        "EmailAttachments",
    }
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_reopening_keeps_the_data(db_path: Path) -> None:
    first = await SqliteStore.open(db_path)
    user = await first.create_user("alice@example.com", display_name=None, aliases=())
    await first.aclose()

    second = await SqliteStore.open(db_path)
    try:
        assert await second.find_user_by_address("alice@example.com") == user
    finally:
        await second.aclose()


async def test_relative_path_is_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStore("relative.db")
    monkeypatch.chdir("/")

    assert store.path == str(tmp_path / "relative.db")
    await store.aclose()


async def test_values_are_stored_in_the_platforms_text_forms(
    store: SqliteStore, db_path: Path
) -> None:
    user = await store.create_user("alice@example.com", display_name=None, aliases=["a@x.test"])
    received = datetime(2024, 2, 3, 4, 5, 6, 7, tzinfo=UTC)
    email = new_email(
        received_at=received,
        header_recipients=(to("alice@example.com"),),
        envelope_recipients=("alice@example.com",),
        attachments=(attachment("a.bin", b"\x00\x01\x02"),),
    )
    await store.save_email(email)

    assert query(db_path, 'SELECT "Id", "ReceivedAt" FROM "Emails"') == [
        (str(email.id), "2024-02-03T04:05:06.000007+00:00")
    ]
    assert query(db_path, 'SELECT "UserId", "IsRead", "Type" FROM "EmailRecipients"') == [
        (str(user.id), 0, "To")
    ]
    assert query(db_path, 'SELECT "IsVerified" FROM "UserEmailAddresses"') == [(1,)]
    assert query(db_path, 'SELECT "SizeBytes", "Content" FROM "EmailAttachments"') == [
        (3, b"\x00\x01\x02")
    ]
    assert str(user.id) == str(user.id).lower()


async def test_deleting_a_user_unlinks_their_recipient_rows(
    store: SqliteStore, db_path: Path
) -> None:
    user = await store.create_user("alice@example.com", display_name=None, aliases=["a@x.test"])
    saved = await store.save_email(new_email(envelope_recipients=("alice@example.com",)))

    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute('DELETE FROM "Users" WHERE "Id" = ?', (str(user.id),))

    email = await store.get_email(saved.id)
    assert email is not None
    assert [r.user_id for r in email.recipients] == [None]
    assert query(db_path, 'SELECT count(*) FROM "UserEmailAddresses"') == [(0,)]


async def test_concurrent_saves_are_group_committed(store: SqliteStore, gate: BatchGate) -> None:
    first, *rest = [new_email() for _ in range(20)]
    outcomes: dict[uuid.UUID, Outcome] = {}
    save = saver(store, outcomes)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, first)
        assert len(await gate.entered.receive()) == 1
        assert store.pool_stats().active == 1
        for email in rest:
            nursery.start_soon(save, email)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        assert len(await gate.entered.receive()) == 19
        gate.allow()

    assert all(isinstance(outcomes[email.id], SavedEmail) for email in [first, *rest])
    assert len(await store.list_emails(limit=100)) == 20
    assert store.pool_stats().active == 0


async def test_a_bad_message_in_a_batch_fails_alone(
    store: SqliteStore, gate: BatchGate, db_path: Path
) -> None:
    good = [new_email(attachments=(attachment("a.bin", b"a"),)) for _ in range(4)]
    unnamed = attrs.evolve(attachment("b.bin", b"b"), file_name=cast(str, None))
    bad = new_email(attachments=(attachment("b.bin", b"b"), unnamed))
    outcomes: dict[uuid.UUID, Outcome] = {}
    save = saver(store, outcomes)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, new_email())
        await gate.entered.receive()
        for email in [*good[:2], bad, *good[2:]]:
            nursery.start_soon(save, email)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        assert len(await gate.entered.receive()) == 5
        gate.allow()

    assert isinstance(outcomes[bad.id], StoreError)
    assert all(isinstance(outcomes[email.id], SavedEmail) for email in good)
    assert query(db_path, 'SELECT count(*) FROM "Emails"') == [(5,)]
    assert query(db_path, 'SELECT count(*) FROM "EmailAttachments"') == [(4,)]
    assert query(db_path, 'SELECT count(*) FROM "Emails" WHERE "Id" = ?', (str(bad.id),)) == [(0,)]


async def test_a_duplicate_in_a_batch_raises_for_its_own_caller(
    store: SqliteStore, gate: BatchGate
) -> None:
    one = new_email(subject="one")
    other = new_email(id=one.id, subject="other")
    rest = [new_email() for _ in range(3)]
    outcomes: dict[str, Outcome] = {}

    async def save(email: NewEmail) -> None:
        try:
            outcomes[email.subject] = await store.save_email(email)
        except StoreError as exc:
            outcomes[email.subject] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save_email, new_email())
        await gate.entered.receive()
        for email in [rest[0], one, other, *rest[1:]]:
            nursery.start_soon(save, email)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        assert len(await gate.entered.receive()) == 5
        gate.allow()

    # Whichever of the two came first in the batch is stored; the other alone fails.
    failed = [subject for subject, outcome in outcomes.items() if isinstance(outcome, Exception)]
    assert failed in (["one"], ["other"])
    assert not isinstance(outcomes[failed[0]], StoreUnavailable)
    kept = await store.get_email(one.id)
    assert kept is not None
    assert kept.subject == ({"one", "other"} - set(failed)).pop()
    assert len(await store.list_emails()) == 3 + 1 + 1


async def test_when_sqlite_abandons_the_batch_each_message_is_retried_alone(
    store: SqliteStore, db_path: Path, gate: BatchGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed = new_email(subject="too big for the disk")
    others = [new_email() for _ in range(3)]
    insert = saving.insert_email

    def insert_or_fill_the_disk(conn: sqlite3.Connection, email: NewEmail) -> SavedEmail:
        if email.id == doomed.id:
            # As after SQLITE_FULL: SQLite has rolled the whole transaction back.
            conn.execute("ROLLBACK")
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise error
        return insert(conn, email)

    monkeypatch.setattr(saving, "insert_email", insert_or_fill_the_disk)
    outcomes: dict[uuid.UUID, Outcome] = {}
    save = saver(store, outcomes)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, new_email())
        await gate.entered.receive()
        for email in [others[0], doomed, *others[1:]]:
            nursery.start_soon(save, email)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        assert len(await gate.entered.receive()) == 4
        gate.allow()

    assert isinstance(outcomes[doomed.id], StoreUnavailable)
    assert all(isinstance(outcomes[email.id], SavedEmail) for email in others)
    assert query(db_path, 'SELECT count(*) FROM "Emails"') == [(4,)]


async def test_a_save_cancelled_while_queued_is_not_stored(
    store: SqliteStore, gate: BatchGate
) -> None:
    withdrawn = new_email()
    later = new_email()
    cancel_scope = trio.CancelScope()

    async def save_then_give_up() -> None:
        with cancel_scope:
            await store.save_email(withdrawn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save_email, new_email())
        await gate.entered.receive()
        nursery.start_soon(save_then_give_up)
        await trio.testing.wait_all_tasks_blocked()
        cancel_scope.cancel()
        gate.allow()
    gate.allow()
    await store.save_email(later)

    assert cancel_scope.cancelled_caught
    assert await store.get_email(withdrawn.id) is None
    assert await store.get_email(later.id) is not None


async def test_a_cancelled_leader_still_delivers_its_batch(
    store: SqliteStore, gate: BatchGate
) -> None:
    emails = {email.id: email for email in [new_email() for _ in range(4)]}
    outcomes: dict[uuid.UUID, Outcome] = {}
    save = saver(store, outcomes)
    scopes = {email_id: trio.CancelScope() for email_id in emails}

    async def save_cancellably(email: NewEmail) -> None:
        with scopes[email.id]:
            await save(email)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save_email, new_email())
        await gate.entered.receive()
        for email in emails.values():
            nursery.start_soon(save_cancellably, email)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        leader, *followers = await gate.entered.receive()
        scopes[leader].cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()

    assert sorted(followers) == sorted(set(emails) - {leader})
    assert all(isinstance(outcomes[email_id], SavedEmail) for email_id in followers)
    for email_id in emails:
        assert await store.get_email(email_id) is not None


async def test_a_save_cancelled_once_in_a_batch_is_stored_anyway(
    store: SqliteStore, gate: BatchGate
) -> None:
    emails = [new_email() for _ in range(4)]
    cancel_scope = trio.CancelScope()

    async def save_all() -> None:
        with cancel_scope:
            async with trio.open_nursery() as inner:
                for email in emails:
                    inner.start_soon(store.save_email, email)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save_email, new_email())
        await gate.entered.receive()
        nursery.start_soon(save_all)
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()
        assert len(await gate.entered.receive()) == 4
        cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.allow()

    for email in emails:
        assert await store.get_email(email.id) is not None


async def test_a_write_lock_held_elsewhere_is_unavailable_not_an_error(db_path: Path) -> None:
    store = await SqliteStore.open(db_path, busy_timeout_ms=20)
    try:
        user = await store.create_user("alice@example.com", display_name=None, aliases=())
        email = new_email()
        with write_lock_held(db_path):
            with pytest.raises(StoreUnavailable):
                await store.save_email(email)
            with pytest.raises(StoreUnavailable):
                await store.revoke_api_key(uuid.uuid4())
            # WAL: readers are not blocked by a writer.
            assert await store.find_user_by_address("alice@example.com") == user
        assert await store.get_email(email.id) is None
        await store.save_email(email)
        assert await store.get_email(email.id) is not None
    finally:
        await store.aclose()


async def test_a_locked_batch_fails_every_message_as_unavailable(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = BatchGate()
    monkeypatch.setattr(saving, "save_batch", gate)
    store = await SqliteStore.open(db_path, busy_timeout_ms=20)
    emails = [new_email() for _ in range(4)]
    outcomes: dict[uuid.UUID, Outcome] = {}
    save = saver(store, outcomes)
    try:
        with write_lock_held(db_path):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(save, new_email())
                await gate.entered.receive()
                for email in emails:
                    nursery.start_soon(save, email)
                await trio.testing.wait_all_tasks_blocked()
                gate.allow()
                assert len(await gate.entered.receive()) == 4
                gate.allow()
        assert len(outcomes) == 5
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes.values())
        assert len({id(outcome) for outcome in outcomes.values()}) == 5
        assert await store.list_emails() == []
    finally:
        await store.aclose()


async def test_an_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await SqliteStore.open(tmp_path / "missing-directory" / "relate-smtp.db")


async def test_a_closed_store_is_unavailable(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await store.aclose()
    await store.aclose()

    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.save_email(new_email())


async def test_pool_stats_report_the_thread_limit(db_path: Path) -> None:
    store = await SqliteStore.open(db_path, max_threads=3)
    try:
        assert store.pool_stats().maximum == 3
        assert store.pool_stats().active == 0
    finally:
        await store.aclose()


async def test_two_stores_on_one_file_save_concurrently(db_path: Path) -> None:
    """Two server processes sharing the file, as far as SQLite can tell."""
    first = await SqliteStore.open(db_path)
    second = await SqliteStore.open(db_path)
    user = await first.create_user("alice@example.com", display_name=None, aliases=())
    emails = [
        new_email(envelope_recipients=("alice@example.com",), in_reply_to="root@example.com")
        for _ in range(40)
    ]
    results: list[SavedEmail] = []

    async def save(target: SqliteStore, email: NewEmail) -> None:
        results.append(await target.save_email(email))

    try:
        root = await second.save_email(new_email(message_id="root@example.com"))
        async with trio.open_nursery() as nursery:
            for index, email in enumerate(emails):
                nursery.start_soon(save, (first, second)[index % 2], email)
        assert len(results) == 40
        assert all(r.linked_user_ids == (user.id,) and r.thread_id == root.id for r in results)
        assert len(await second.list_emails(limit=100)) == 41
    finally:
        await first.aclose()
        await second.aclose()


async def test_opening_twice_at_once_creates_the_schema_once(db_path: Path) -> None:
    stores: list[SqliteStore] = []

    async def open_one() -> None:
        stores.append(await SqliteStore.open(db_path))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(open_one)
    for opened in stores:
        await opened.ping()
        await opened.aclose()
    assert len(stores) == 8
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


DB_FILES = ("", "-wal", "-shm")


def modes(path: Path) -> dict[str, int]:
    return {suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) for suffix in DB_FILES}


@pytest.fixture(params=[0o022, 0o002, 0o277], ids=["022", "002", "277"])
def umask(request: pytest.FixtureRequest, db_path: Path) -> Iterator[int]:
    """The process umask while the test runs (``db_path``'s directory already exists)."""
    previous = os.umask(request.param)
    try:
        yield cast(int, request.param)
    finally:
        os.umask(previous)


async def test_new_database_files_are_private_whatever_the_umask(umask: int, db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    try:
        await store.save_email(new_email(attachments=(attachment("a.pdf", b"%PDF"),)))
        assert modes(db_path) == dict.fromkeys(DB_FILES, 0o600)
    finally:
        await store.aclose()
    assert os.umask(umask) == umask, "the process umask is left as it was"


async def test_an_existing_database_others_may_read_is_reported_not_changed(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await (await SqliteStore.open(db_path)).aclose()
    os.chmod(db_path, 0o644)

    with caplog.at_level(logging.WARNING, logger="relate_smtp.storage"):
        store = await SqliteStore.open(db_path)
        await store.aclose()

    assert f"{db_path} (0644)" in caplog.text and "chmod 600" in caplog.text
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o644


async def test_a_private_database_opens_without_a_warning(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await (await SqliteStore.open(db_path)).aclose()

    with caplog.at_level(logging.WARNING, logger="relate_smtp.storage"):
        store = await SqliteStore.open(db_path)
        await store.aclose()

    assert not caplog.records
