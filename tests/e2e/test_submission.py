"""The runnable server end to end: real sockets, smtplib as the client, SQLite store."""

from __future__ import annotations

import base64
import contextlib
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from contextlib import closing
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import attrs
import pytest
import trio

from relate_smtp.storage import NewEmail, SavedEmail
from relate_smtp.storage.records import RECIPIENT_TO
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    add_account,
    add_key,
    client,
    client_over_tls,
    free_port,
    in_thread,
    make_settings,
    running_server,
    watch_log,
)


def simple_message(sender: str = "alice@example.com", to: str = "bob@example.org") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice Example <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Hello"
    msg["Message-ID"] = "<hello-1@example.com>"
    msg.set_content("Hi Bob,\n\nthis is a test.\n")
    return msg.as_bytes()


def plain_token(username: str, password: str) -> str:
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


async def stored_count(store: SqliteStore) -> int:
    return len(await store.list_emails(1000))


async def test_auth_plain_and_send_stores_message(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com", name="Alice")
    settings = make_settings(tmp_path)
    async with running_server(settings, store) as running:
        port = running.port("submission")

        def send() -> None:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                smtp.login("alice@example.com", account.key)
                smtp.sendmail("alice@example.com", ["bob@example.org"], simple_message())

        await in_thread(send)
    emails = await store.list_emails(10)
    assert len(emails) == 1
    full = await store.get_email(emails[0].id)
    assert full is not None
    assert full.subject == "Hello"
    assert full.message_id == "hello-1@example.com"
    assert full.sent_by_user_id == account.user.id


@attrs.define
class RecordingListener:
    """Stands in for the notifier: the user ids each stored message would notify."""

    notified: list[tuple[uuid.UUID, ...]] = attrs.Factory(list)

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        self.notified.append(saved.linked_user_ids)


async def add_unverified_alias(db: Path, user_id: uuid.UUID, address: str) -> None:
    """A ``UserEmailAddresses`` row as the platform writes it: ``IsVerified`` false."""

    def work() -> None:
        with closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute(
                'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified",'
                ' "AddedAt") VALUES (?, ?, ?, 0, ?)',
                (str(uuid.uuid4()), str(user_id), address, datetime.now(UTC).isoformat()),
            )

    await trio.to_thread.run_sync(work)


async def test_submission_to_an_unverified_alias_links_its_user(
    tmp_path: Path, store: SqliteStore, db_path: Path
) -> None:
    """SPEC §5: a user's additional address links the row, verified or not (the
    platform cannot verify them; the original's GetByEmailAsync ignores IsVerified)."""
    account = await add_account(store, "alice@example.com")
    bob = await store.create_user("bob@example.org", display_name=None, aliases=())
    await add_unverified_alias(db_path, bob.id, "Bob.Work@Example.org")
    recorder = RecordingListener()
    settings = make_settings(tmp_path)
    async with running_server(settings, store, new_mail_listener=recorder) as running:
        port = running.port("submission")

        def send() -> None:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                smtp.login("alice@example.com", account.key)
                smtp.sendmail(
                    "alice@example.com",
                    ["bob.work@example.org"],
                    simple_message(to="bob.work@example.org"),
                )

        await in_thread(send)
    (email,) = await store.list_emails(10)
    full = await store.get_email(email.id)
    assert full is not None
    assert [(r.address, r.type, r.user_id) for r in full.recipients] == [
        ("bob.work@example.org", RECIPIENT_TO, bob.id)
    ]
    assert recorder.notified == [(bob.id,)]


async def test_auth_login_succeeds(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com")
    async with running_server(make_settings(tmp_path), store) as running:
        port = running.port("submission")

        def login() -> tuple[int, bytes]:
            with client(port) as smtp:
                smtp.ehlo()
                smtp.user, smtp.password = "alice@example.com", account.key
                return smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)

        code, _ = await in_thread(login)
    assert code == 235


@pytest.mark.parametrize("case", ["wrong", "revoked", "no-scope", "unknown-user"])
async def test_bad_credentials_get_535(tmp_path: Path, store: SqliteStore, case: str) -> None:
    account = await add_account(
        store, "alice@example.com", scopes=("api",) if case == "no-scope" else ("smtp",)
    )
    password = account.key
    username = "alice@example.com"
    if case == "wrong":
        password = account.key[:-4] + "XXXX"
    elif case == "revoked":
        assert await store.revoke_api_key(account.key_id)
    elif case == "unknown-user":
        username = "nobody@example.com"
    async with running_server(make_settings(tmp_path), store) as running:
        port = running.port("submission")

        def login() -> int:
            # One AUTH PLAIN: smtplib.login would retry with LOGIN and meet the backoff.
            with client(port) as smtp:
                smtp.ehlo()
                return smtp.docmd("AUTH", "PLAIN " + plain_token(username, password))[0]

        assert await in_thread(login) == 535


async def test_legacy_key_without_prefix_authenticates(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com", prefix=False)
    async with running_server(make_settings(tmp_path), store) as running:
        port = running.port("submission")

        def login() -> int:
            with client(port) as smtp:
                smtp.ehlo()
                return smtp.login("ALICE@example.com", account.key)[0]

        assert await in_thread(login) == 235


async def test_mail_before_auth_gets_530(tmp_path: Path, store: SqliteStore) -> None:
    async with running_server(make_settings(tmp_path), store) as running:
        port = running.port("submission")

        def mail() -> int:
            with client(port) as smtp:
                smtp.ehlo()
                return smtp.mail("alice@example.com")[0]

        assert await in_thread(mail) == 530


async def test_starttls_then_auth_then_send(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    account = await add_account(store, "alice@example.com")
    async with running_server(make_settings(tmp_path), store, tls_context=server_tls) as running:
        port = running.port("submission")

        def send() -> list[str]:
            with client(port) as smtp:
                smtp.ehlo()
                assert smtp.has_extn("starttls")
                smtp.starttls(context=client_tls)
                smtp.ehlo()
                smtp.login("alice@example.com", account.key)
                smtp.sendmail("alice@example.com", ["bob@example.org"], simple_message())
                return sorted(smtp.esmtp_features)

        features = await in_thread(send)
    assert "starttls" not in features
    assert await stored_count(store) == 1


async def test_implicit_tls_listener(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    account = await add_account(store, "alice@example.com")
    settings = make_settings(tmp_path, f"Smtp:SecurePort={free_port()}")
    async with running_server(settings, store, tls_context=server_tls) as running:
        port = running.port("submission-tls")

        def send() -> None:
            with client_over_tls(port, client_tls) as smtp:
                smtp.ehlo()
                assert not smtp.has_extn("starttls")
                smtp.login("alice@example.com", account.key)
                smtp.sendmail("alice@example.com", ["bob@example.org"], simple_message())

        await in_thread(send)
    assert await stored_count(store) == 1


async def test_no_certificate_means_no_implicit_listener(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, f"Smtp:SecurePort={free_port()}")
    async with running_server(settings, store) as running:
        assert [item.name for item in running.bound] == ["submission", "health"]
        assert running.bound[0].tls == "none"


@pytest.mark.parametrize("secure_port", ["-1", "-465", "0"])
async def test_secure_port_zero_or_less_disables_implicit_tls(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, secure_port: str
) -> None:
    """SPEC §1: as in the original, SecurePort ≤ 0 turns 465 off; start-up goes on even
    with a certificate, and the other listeners open as usual."""
    settings = make_settings(
        tmp_path,
        f"Smtp:SecurePort={secure_port}",
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:Port=0",
        "Smtp:Mx:HostedDomains:0=example.com",
    )
    with watch_log("relate_smtp.lifecycle") as lifecycle:
        async with running_server(settings, store, tls_context=server_tls) as running:
            names = [item.name for item in running.bound]
            port = running.port("submission")
            code = await in_thread(lambda: client(port).quit()[0])
    assert names == ["submission", "mx", "health"]
    assert code == 221
    listening = lifecycle.matching(r"^Listening: ")
    assert [line.split()[1] for line in listening] == ["submission", "mx", "health"]
    assert lifecycle.matching(r"^Starting SMTP server on port \d+ \(plain\)$")


async def test_rate_limiter_locks_out_after_failures(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com")
    settings = make_settings(
        tmp_path,
        "Security:RateLimit:MaxFailedAttempts=3",
        # No backoff between failures, so only the lockout can block.
        "Security:RateLimit:BaseBackoffDelay=0",
        "Security:RateLimit:MaxBackoffDelay=0",
    )
    async with running_server(settings, store) as running:
        port = running.port("submission")

        def attempts() -> list[int]:
            codes = []
            with client(port) as smtp:
                smtp.ehlo()
                for password in ["bad1", "bad2", "bad3", "bad4", account.key]:
                    token = plain_token("alice@example.com", password)
                    code, _ = smtp.docmd("AUTH", "PLAIN " + token)
                    codes.append(code)
            return codes

        codes = await in_thread(attempts)
    assert codes[:3] == [535, 535, 535]
    assert codes[3:] == [454, 454]


async def test_second_key_for_user(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com")
    second = await add_key(store, account.user)
    async with running_server(make_settings(tmp_path), store) as running:
        port = running.port("submission")

        def login() -> int:
            with client(port) as smtp:
                smtp.ehlo()
                return smtp.login("alice@example.com", second.key)[0]

        assert await in_thread(login) == 235


async def test_authentication_is_forgotten_after_starttls(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """RFC 3207 §4.2: a login made in plain text does not carry over into TLS."""
    account = await add_account(store, "alice@example.com")
    settings = make_settings(
        tmp_path,
        "Smtp:RequireAuthentication=false",
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:HostedDomains:0=example.com",
    )
    async with running_server(settings, store, tls_context=server_tls) as running:
        port = running.port("submission")

        def talk() -> tuple[int, int]:
            with client(port) as smtp:
                smtp.ehlo()
                auth = smtp.docmd("AUTH", "PLAIN " + plain_token(account.user.email, account.key))
                smtp.starttls(context=client_tls)
                smtp.ehlo()
                return auth[0], smtp.mail("alice@example.com")[0]

        assert await in_thread(talk) == (235, 530)


def flood_and_read_slowly(port: int, garbage: bytes) -> bytes:
    """Pipeline ``garbage`` from a second thread while reading slowly until EOF or reset.

    A small receive buffer read a little at a time keeps the server's last replies in
    its send queue when it closes: a close with unread input would reset the connection
    and drop them.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    received = b""

    def keep_sending() -> None:
        # The server may go away first: the test looks at what was read.
        with contextlib.suppress(OSError):
            sock.sendall(garbage)

    with closing(sock):
        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(0.3)
        sock.settimeout(10)
        try:
            while chunk := sock.recv(256):
                received += chunk
                time.sleep(0.002)
        except ConnectionResetError:
            pass
        sender.join()
    return received


async def test_421_reaches_a_client_still_sending(tmp_path: Path, store: SqliteStore) -> None:
    """Past MaxErrors the 421 is read before EOF even by a client that keeps pipelining:
    the server half-closes and drains instead of resetting the connection."""
    settings = make_settings(tmp_path, "Smtp:MaxErrors=100")
    async with running_server(settings, store) as running:
        port = running.port("submission")
        # More than one read (64 KiB), so input is left unread at the close, but what is
        # left after the 101 lines answered stays within the 64 KiB drained.
        garbage = b"GARBAGE\r\n" * 7_350
        received = await in_thread(lambda: flood_and_read_slowly(port, garbage))
    lines = received.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    assert lines[1:102] == [b"500 5.5.2 Command not recognized"] * 101
    assert lines[102:] == [b"421 4.7.0 Too many errors, closing channel", b""]
