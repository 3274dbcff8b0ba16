"""The real server on PostgreSQL while the database misbehaves (SPEC §3, §4, §5, §10).

smtplib clients in threads send to the in-process server whose store is a temporary
PostgreSQL database; the test kills the store's connections with
``pg_terminate_backend`` during the traffic, starts a server on a database that is not
there, and one on a database without tables. Whatever happens the client sees 250 or a
4xx, never a 5xx; a 250 means the message is stored exactly once with all its rows; a
4xx means it is absent or (when the connection died after PostgreSQL committed but
before it said so) stored whole; and the server recovers without a restart.
"""

from __future__ import annotations

import base64
import functools
import smtplib
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio

from relate_smtp.app import check_store
from relate_smtp.storage import NewEmail, SavedEmail, SchemaMissing
from relate_smtp.storage.connstring import parse_connection_string
from relate_smtp.storage.postgres import open_postgres_store
from tests.e2e.helpers import (
    add_account,
    client,
    free_port,
    in_thread,
    make_settings,
    running_server,
)
from tests.robustness.helpers import Progress
from tests.storage.helpers import TempDatabase, temporary_database

# Needs the PostgreSQL test server: skipped without it, a failure when CI=true.
needs_postgres = pytest.mark.usefixtures("postgres_available")

LOCAL = "rcpt@example.com"
REMOTE = "someone@remote.example"
SENDER = "sender@sender.example"
OPEN_SUBMISSION = "Smtp:RequireAuthentication=false"  # MX off: every RCPT is accepted
ACCEPTED = 250
FAILED = 451  # SPEC §5: 451 4.3.0 when the store fails

THREADS = 6
PER_THREAD = 30
# After this many messages have been answered, kill the store's connections. The
# "blocked" rounds first stop a batch inside its statement with a table lock, so they
# are sure to fail messages; the others strike wherever the traffic happens to be.
KILLS: Sequence[tuple[int, bool]] = ((15, True), (50, False), (90, True), (130, False))


def message(message_id: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Sender <{SENDER}>"
    msg["To"] = LOCAL
    msg["Cc"] = REMOTE
    msg["Subject"] = "outage"
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content("x" * 2000)
    return msg.as_bytes()


def send(smtp: smtplib.SMTP, message_id: str) -> int:
    """The code that ended the transaction: DATA's final reply, or the refusal."""
    try:
        refused = smtp.sendmail(SENDER, [LOCAL, REMOTE], message(message_id))
    except smtplib.SMTPResponseException as exc:  # MAIL or DATA refused
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return min(code for code, _ in exc.recipients.values())
    if refused:  # some RCPT refused: count the transaction as failed
        return min(code for code, _ in refused.values())
    return ACCEPTED


def sender_thread(
    port: int, prefix: str, count: int, results: dict[str, int], progress: Progress
) -> Callable[[], None]:
    def run() -> None:
        with client(port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            for n in range(count):
                message_id = f"{prefix}-{n}-{uuid.uuid4().hex[:8]}@test.example"
                results[message_id] = send(smtp, message_id)
                trio.from_thread.run_sync(progress.record)

    return run


async def stored_copies(db: TempDatabase) -> dict[str, list[int]]:
    """Message-ID (stored bare) → the recipient-row count of each stored copy."""
    rows = await db.fetch(
        'SELECT e."MessageId" AS id,'
        ' (SELECT count(*) FROM "EmailRecipients" r WHERE r."EmailId" = e."Id") AS recipients,'
        ' (SELECT count(*) FROM "EmailRecipients" r WHERE r."EmailId" = e."Id"'
        '   AND r."UserId" IS NOT NULL) AS linked'
        ' FROM "Emails" e'
    )
    copies: dict[str, list[int]] = {}
    for row in rows:
        assert row["linked"] == 1, "the local recipient is linked in every stored copy"
        copies.setdefault(row["id"], []).append(row["recipients"])
    return copies


async def kill_during_traffic(db: TempDatabase, progress: Progress) -> tuple[int, int]:
    """Run the KILLS schedule; return (connections killed, batches stopped and killed)."""
    application = db.params.application_name or ""
    killed = blocked_kills = 0
    for threshold, blocked in KILLS:
        await progress.reached(threshold)
        if blocked:
            async with db.locked("EmailRecipients"):
                stuck = await db.sessions_waiting_on_locks(1)
                killed += await db.terminate(stuck)
                blocked_kills += 1
        killed += await db.terminate_connections(application)
    return killed, blocked_kills


@pytest.mark.postgres
@needs_postgres
async def test_killing_the_database_connections_during_traffic(tmp_path: Path) -> None:
    async with temporary_database("init") as db, open_postgres_store(db.params) as store:
        await store.create_user(LOCAL, display_name=None, aliases=())
        results: dict[str, int] = {}
        progress = Progress()
        kills: list[tuple[int, int]] = []
        async with running_server(
            make_settings(tmp_path, OPEN_SUBMISSION),
            store,
            new_mail_listener=NoNotifications(),
        ) as running:
            port = running.port("submission")

            async def killer() -> None:
                kills.append(await kill_during_traffic(db, progress))

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(killer)
                    for t in range(THREADS):
                        thread = sender_thread(port, f"t{t}", PER_THREAD, results, progress)
                        nursery.start_soon(in_thread, thread)

                # recovery: after the last kill, on a new connection, everything goes in
                later: dict[str, int] = {}
                await in_thread(sender_thread(port, "later", 5, later, Progress()))

        assert len(results) == THREADS * PER_THREAD
        codes = Counter(results.values())
        assert set(codes) <= {ACCEPTED, FAILED}, codes  # 4xx only, never a 5xx
        assert codes[FAILED] >= 2, codes  # each blocked round failed a batch
        assert codes[ACCEPTED] >= len(results) // 2, codes
        ((killed, blocked_kills),) = kills
        assert blocked_kills == 2 and killed >= 2
        assert set(later.values()) == {ACCEPTED}

        copies = await stored_copies(db)
        for message_id, code in {**results, **later}.items():
            if code == ACCEPTED:
                assert copies.get(message_id) == [2], message_id  # once, with both rows
            else:
                # absent, or stored whole when the commit outran the lost connection
                assert copies.get(message_id, [2]) == [2], message_id
        assert set(copies) <= set(results) | set(later)  # nothing else was stored


class NoNotifications:
    """Notification is not under test here; the real notifier would spend the server's
    shutdown drain retrying an API that does not exist."""

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        pass


def plain_token(username: str, password: str) -> str:
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


async def test_a_server_on_an_unreachable_database_answers_4xx(tmp_path: Path) -> None:
    """PostgreSQL down at start-up (a closed port): the server starts; AUTH answers 454,
    a message 451, an MX RCPT that needs a lookup 451 — never a 5xx."""
    params = parse_connection_string(f"Host=127.0.0.1;Port={free_port()};Username=x;Timeout=2")
    submission_only = make_settings(tmp_path, OPEN_SUBMISSION)
    with_mx = make_settings(
        tmp_path,
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:Port=0",
        "Smtp:Mx:HostedDomains:0=example.com",
        "Smtp:Mx:ValidateRecipients=true",
    )
    replies: dict[str, tuple[int, bytes]] = {}
    async with open_postgres_store(params) as store:
        await check_store(store)  # the runtime's start-up check lets it start

        def submit(port: int) -> None:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                for attempt in range(2):
                    replies[f"auth{attempt}"] = smtp.docmd(
                        "AUTH", "PLAIN " + plain_token(LOCAL, "rk_0123456789abcdef")
                    )
                replies["mail"] = smtp.mail(SENDER)
                replies["rcpt"] = smtp.rcpt(LOCAL)
                replies["data"] = smtp.data(message(f"{uuid.uuid4()}@test.example"))

        def deliver(port: int) -> None:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                replies["mx mail"] = smtp.mail(SENDER)
                replies["mx rcpt"] = smtp.rcpt(LOCAL)

        with trio.fail_after(60):
            async with running_server(submission_only, store) as running:
                await in_thread(functools.partial(submit, running.port("submission")))
            async with running_server(with_mx, store) as running:
                await in_thread(functools.partial(deliver, running.port("mx")))

    codes = {step: code for step, (code, _) in replies.items()}
    assert codes == {
        **{f"auth{attempt}": 454 for attempt in range(2)},
        "mail": 250,
        "rcpt": 250,
        "data": 451,
        "mx mail": 250,
        "mx rcpt": 451,
    }
    assert all(replies[step][1].startswith(b"4.") for step in codes if codes[step] >= 400)


@pytest.mark.postgres
@needs_postgres
async def test_the_same_session_recovers_after_its_message_failed(tmp_path: Path) -> None:
    """The connection under a batch is killed in the middle of an authenticated
    session: that message gets 451, and the same SMTP session's next message goes in
    (no restart, no new login)."""
    async with temporary_database("init") as db, open_postgres_store(db.params) as store:
        account = await add_account(store, LOCAL)
        async with running_server(
            make_settings(tmp_path), store, new_mail_listener=NoNotifications()
        ) as running:
            port = running.port("submission")

            async with trio.open_nursery() as nursery, db.locked("EmailRecipients"):
                session = trio.Event()
                codes: list[int] = []

                def first_message() -> None:
                    with client(port) as smtp:
                        smtp.ehlo("client.example")
                        smtp.login(LOCAL, account.key)
                        codes.append(send(smtp, f"{uuid.uuid4()}@test.example"))
                        trio.from_thread.run_sync(session.set)
                        codes.append(send(smtp, f"{uuid.uuid4()}@test.example"))

                nursery.start_soon(in_thread, first_message)
                await db.terminate(await db.sessions_waiting_on_locks(1))
                await session.wait()

        assert codes == [FAILED, ACCEPTED]
        assert [len(v) for v in (await stored_copies(db)).values()] == [1]


@pytest.mark.postgres
@needs_postgres
async def test_a_database_without_tables_stops_start_up_naming_db_init() -> None:
    async with temporary_database("empty") as db, open_postgres_store(db.params) as store:
        with pytest.raises(SchemaMissing, match="relate-smtp db init"):
            await check_store(store)
        with pytest.raises(SchemaMissing, match="relate-smtp db init"):
            await store.check_schema()

        await store.init_schema()
        await check_store(store)
