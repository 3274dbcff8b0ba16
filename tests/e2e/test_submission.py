"""The runnable server end to end: real sockets, smtplib as the client, SQLite store."""

from __future__ import annotations

import base64
import ssl
from email.message import EmailMessage
from pathlib import Path

import pytest

from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.harness import (
    add_account,
    add_key,
    client,
    client_over_tls,
    free_port,
    in_thread,
    make_settings,
    running_server,
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


async def test_rate_limiter_locks_out_after_failures(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com")
    settings = make_settings(
        tmp_path,
        "Security:RateLimit:MaxFailedAttempts=3",
        # No backoff between failures, so only the lockout can block.
        "Security:RateLimit:BaseBackoffDelaySeconds=0",
        "Security:RateLimit:MaxBackoffDelaySeconds=0",
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
