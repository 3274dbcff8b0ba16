"""Issue 15 over real sockets: SPF, DKIM and DMARC on the MX listener.

A loopback authoritative DNS server (tests/sender_auth/dns_server.py) serves the test
domains' SPF, DKIM key and DMARC records; the server under test asks it through
``Smtp:Mx:SenderAuthentication:DnsServers``. Clients connect from 127.0.0.1, so a domain
whose SPF record lists only 192.0.2.1 does not authorise them.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import dkim
import nacl.signing
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relate_smtp.storage import NewEmail, SavedEmail
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    Account,
    LogWatcher,
    RunningServer,
    add_account,
    client,
    in_thread,
    make_settings,
    running_server,
    scrape,
    watch_log,
)
from tests.sender_auth.dns_server import DnsServer

HOSTED = "hosted.example"
ALICE = f"alice@{HOSTED}"
AUTHSERV_ID = "mx.relate.test"
#: SPF-authorised for the client (127.0.0.1) / not.
GOOD = "good.example"
BANK = "bank.example"
ELSEWHERE = "192.0.2.1"
AR_LINE = r"Authentication-Results: mx\.relate\.test;"

Code = tuple[int, str]
QUEUED: Code = (250, "2.0.0")
REFUSED: Code = (550, "5.7.1")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


# --------------------------------------------------------------------------- keys


@attrs.frozen
class Key:
    """A DKIM signing key and the TXT record that publishes it."""

    algorithm: bytes
    private: bytes
    record: str


@pytest.fixture(scope="module")
def rsa_key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(b"rsa-sha256", pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


@pytest.fixture(scope="module")
def ed25519_key() -> Key:
    seed = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(seed.verify_key)).decode()
    return Key(b"ed25519-sha256", base64.b64encode(bytes(seed)), f"v=DKIM1; k=ed25519; p={public}")


def message(author: str, *, body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: Sender <{author}>\r\nTo: <{ALICE}>\r\nSubject: Test\r\n"
        f"Message-ID: <{author.replace('@', '.')}@test>\r\n\r\n{body}"
    ).encode()


def sign(raw: bytes, key: Key, *, domain: str, selector: str = "s1") -> bytes:
    """Prepend a DKIM-Signature made by dkimpy."""
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=key.algorithm,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return bytes(header) + raw


def publish(dns: DnsServer, key: Key, *, domain: str, selector: str = "s1") -> None:
    dns.txt(f"{selector}._domainkey.{domain}", key.record)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    server = DnsServer()
    server.txt(GOOD, "v=spf1 ip4:127.0.0.1 -all")
    server.txt(f"_dmarc.{GOOD}", "v=DMARC1; p=reject")
    server.txt(BANK, f"v=spf1 ip4:{ELSEWHERE} -all")
    server.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
async def alice(store: SqliteStore) -> Account:
    return await add_account(store, ALICE)


@attrs.frozen
class Mx:
    running: RunningServer
    log: LogWatcher

    @property
    def port(self) -> int:
        return self.running.port("mx")

    async def send(self, raw: bytes, *, mail_from: str) -> tuple[Code, str]:
        return await in_thread(lambda: send(self.port, raw, mail_from=mail_from))

    def results(self) -> list[str]:
        return self.log.matching(AR_LINE)


class NoNotifications:
    """Stands in for the notifier, which would try the Relate API for each message."""

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        pass


@asynccontextmanager
async def mx_server(
    tmp_path: Path,
    store: SqliteStore,
    dns: DnsServer,
    *overrides: str,
    mode: str = "enforce",
    **kwargs: Any,
) -> AsyncIterator[Mx]:
    settings = make_settings(
        tmp_path,
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:Port=0",
        f"Smtp:Mx:HostedDomains:0={HOSTED}",
        f"Smtp:ServerName={AUTHSERV_ID}",
        "HealthCheck:DnsMxDomain=",
        f"Smtp:Mx:SenderAuthentication:Mode={mode}",
        f"Smtp:Mx:SenderAuthentication:DnsServers:0=127.0.0.1:{dns.port}",
        "Smtp:Mx:SenderAuthentication:DnsTimeoutSeconds=1",
        *overrides,
    )
    with watch_log("relate_smtp.sender_auth") as log:
        async with running_server(
            settings, store, new_mail_listener=NoNotifications(), **kwargs
        ) as running:
            yield Mx(running, log)


def code_of(code: int, text: bytes | str) -> tuple[Code, str]:
    words = text.decode() if isinstance(text, bytes) else text
    first = words.split(" ", 1)[0]
    return (code, first if _ENHANCED.fullmatch(first) else ""), words


def send(port: int, raw: bytes, *, mail_from: str) -> tuple[Code, str]:
    """One transaction to alice; the end-of-data reply as (code, enhanced) and text."""
    with client(port) as smtp:
        smtp.ehlo("mail.sender.example")
        assert smtp.mail(mail_from)[0] == 250
        assert smtp.rcpt(ALICE)[0] == 250
        try:
            return code_of(*smtp.data(raw))
        except smtplib.SMTPDataError as exc:
            return code_of(exc.smtp_code, exc.smtp_error)


async def stored(store: SqliteStore) -> int:
    return len(await store.list_emails(1000))


def fields(line: str) -> dict[str, str]:
    """``method=result`` of an Authentication-Results log line (first of each method)."""
    found: dict[str, str] = {}
    for method, result in re.findall(r"[;\s](spf|dkim|dmarc)=(\w+)", line):
        found.setdefault(method, result)
    return found


def only_result(mx: Mx) -> str:
    [line] = mx.results()
    return line


# --------------------------------------------------------------------------- tests


async def test_aligned_dkim_signature_passes_is_stored_and_counted(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, rsa_key: Key
) -> None:
    publish(dns, rsa_key, domain=GOOD)
    raw = sign(message(f"news@{GOOD}"), rsa_key, domain=GOOD)
    async with mx_server(tmp_path, store, dns) as mx:
        health = mx.running.port("health")
        before = await scrape(health)
        reply, _ = await mx.send(raw, mail_from=f"bounce@{GOOD}")
        after = await scrape(health)

    assert reply == QUEUED
    assert await stored(store) == 1
    line = only_result(mx)
    assert fields(line) == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert "header.a=rsa-sha256" in line
    assert "client=127.0.0.1 action=accept" in line

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    for mechanism in ("spf", "dkim", "dmarc"):
        assert moved(f"smtp_sender_auth_results_total{{mechanism={mechanism},result=pass}}") == 1
    assert moved("smtp_sender_auth_wait_seconds_count") == 1


async def test_forged_from_of_a_reject_domain_is_refused_in_enforce(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    async with mx_server(tmp_path, store, dns) as mx:
        reply, text = await mx.send(message(f"security@{BANK}"), mail_from=f"x@{BANK}")
        metrics = await scrape(mx.running.port("health"))

    assert reply == REFUSED
    assert "DMARC" in text and BANK in text
    assert await stored(store) == 0
    line = only_result(mx)
    assert fields(line) == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert "action=refuse" in line
    assert metrics["smtp_rejections_total{reason=sender_authentication}"] == 1


async def test_forged_from_is_accepted_and_logged_in_observe(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    async with mx_server(tmp_path, store, dns, mode="observe") as mx:
        reply, _ = await mx.send(message(f"security@{BANK}"), mail_from=f"x@{BANK}")

    assert reply == QUEUED
    assert await stored(store) == 1
    line = only_result(mx)
    assert fields(line) == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert "action=accept" in line
    assert "policy.dmarc=reject" in line


async def test_spf_fail_with_aligned_dkim_pass_is_a_dmarc_pass(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, rsa_key: Key
) -> None:
    publish(dns, rsa_key, domain=BANK)
    raw = sign(message(f"security@{BANK}"), rsa_key, domain=BANK)
    async with mx_server(tmp_path, store, dns) as mx:
        reply, _ = await mx.send(raw, mail_from=f"x@{BANK}")

    assert reply == QUEUED
    assert fields(only_result(mx)) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}


async def test_pct_zero_is_never_refused(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    dns.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject; pct=0")
    async with mx_server(tmp_path, store, dns) as mx:
        replies = [
            (await mx.send(message(f"security@{BANK}"), mail_from=f"x@{BANK}"))[0] for _ in range(3)
        ]

    assert replies == [QUEUED] * 3
    assert all(fields(line)["dmarc"] == "fail" for line in mx.results())
    assert all("sampled out" in line for line in mx.results())


async def test_quarantine_is_accepted(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    dns.txt(f"_dmarc.{BANK}", "v=DMARC1; p=quarantine")
    async with mx_server(tmp_path, store, dns) as mx:
        reply, _ = await mx.send(message(f"security@{BANK}"), mail_from=f"x@{BANK}")

    assert reply == QUEUED
    line = only_result(mx)
    assert fields(line)["dmarc"] == "fail"
    assert "policy.dmarc=quarantine" in line


async def test_ed25519_signature_verifies(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, ed25519_key: Key
) -> None:
    publish(dns, ed25519_key, domain=BANK)
    raw = sign(message(f"security@{BANK}"), ed25519_key, domain=BANK)
    async with mx_server(tmp_path, store, dns) as mx:
        reply, _ = await mx.send(raw, mail_from=f"x@{BANK}")

    assert reply == QUEUED
    line = only_result(mx)
    assert fields(line) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    assert "header.a=ed25519-sha256" in line


async def test_body_changed_after_signing_fails(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, rsa_key: Key
) -> None:
    publish(dns, rsa_key, domain=BANK)
    raw = sign(message(f"security@{BANK}", body="Pay 10 EUR.\r\n"), rsa_key, domain=BANK)
    tampered = raw.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    async with mx_server(tmp_path, store, dns) as mx:
        reply, _ = await mx.send(tampered, mail_from=f"x@{BANK}")

    assert reply == REFUSED
    assert fields(only_result(mx)) == {"spf": "fail", "dkim": "fail", "dmarc": "fail"}
    assert await stored(store) == 0


@pytest.mark.parametrize("trouble", ["servfail", "silent"])
async def test_dns_trouble_never_refuses(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, trouble: str
) -> None:
    for name in (BANK, f"_dmarc.{BANK}"):
        getattr(dns, trouble)(name)
    async with mx_server(tmp_path, store, dns) as mx:
        reply, _ = await mx.send(message(f"security@{BANK}"), mail_from=f"x@{BANK}")

    assert reply == QUEUED
    assert fields(only_result(mx)) == {"spf": "temperror", "dkim": "none", "dmarc": "temperror"}
    assert await stored(store) == 1


async def test_subdomain_policy_applies(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    dns.txt("corp.example", f"v=spf1 ip4:{ELSEWHERE} -all")
    dns.txt("_dmarc.corp.example", "v=DMARC1; p=none; sp=reject")
    async with mx_server(tmp_path, store, dns) as mx:
        sub, _ = await mx.send(message("ceo@mail.corp.example"), mail_from="x@corp.example")
        top, _ = await mx.send(message("ceo@corp.example"), mail_from="x@corp.example")

    assert (sub, top) == (REFUSED, QUEUED)
    first, second = mx.results()
    assert "header.from=mail.corp.example" in first
    assert "policy.dmarc=reject" in first
    assert "policy.dmarc=none" in second


async def test_organizational_domain_is_found_through_the_psl(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    dns.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")
    async with mx_server(tmp_path, store, dns) as mx:
        reply, text = await mx.send(
            message("boss@a.b.example.co.uk"), mail_from="x@a.b.example.co.uk"
        )

    assert reply == REFUSED
    assert "example.co.uk" in text
    assert dns.count("_dmarc.a.b.example.co.uk", "TXT") == 1
    # RFC 7489 §6.6.3: the From domain, then the organizational domain, nothing between.
    assert dns.count("_dmarc.b.example.co.uk", "TXT") == 0
    assert dns.count("_dmarc.co.uk", "TXT") == 0


async def test_authenticated_mx_sessions_are_not_checked(
    tmp_path: Path,
    store: SqliteStore,
    dns: DnsServer,
    alice: Account,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    raw = message(f"security@{BANK}")

    def session(port: int) -> Code:
        with client(port) as smtp:
            smtp.ehlo("mail.sender.example")
            smtp.starttls(context=client_tls)
            smtp.ehlo("mail.sender.example")
            smtp.login(ALICE, alice.key)
            smtp.mail(f"x@{BANK}")
            smtp.rcpt(ALICE)
            return code_of(*smtp.data(raw))[0]

    async with mx_server(tmp_path, store, dns, tls_context=server_tls) as mx:
        authenticated = await in_thread(lambda: session(mx.port))
        unauthenticated, _ = await mx.send(raw, mail_from=f"x@{BANK}")

    assert (authenticated, unauthenticated) == (QUEUED, REFUSED)
    assert len(mx.results()) == 1  # the unauthenticated one only
    assert dns.count(BANK, "TXT") == 1


async def test_lookups_overlap_the_transaction(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    """SPF is asked at MAIL FROM and DMARC once the From field has arrived, both before
    the end of data: the client is held mid-body until the server has asked."""
    raw = message(f"news@{GOOD}", body="x" * 1000 + "\r\n")
    header, body = raw.split(b"\r\n\r\n", 1)
    async with mx_server(tmp_path, store, dns) as mx:
        smtp = await in_thread(lambda: client(mx.port))
        try:
            await in_thread(lambda: smtp.ehlo("mail.sender.example"))
            await in_thread(lambda: smtp.mail(f"x@{GOOD}"))
            with trio.fail_after(5):
                await dns.wait_for_query(GOOD, "TXT")
            await in_thread(lambda: smtp.rcpt(ALICE))
            assert (await in_thread(lambda: smtp.docmd("DATA")))[0] == 354
            await in_thread(lambda: smtp.send(header + b"\r\n\r\n" + body[:100]))
            with trio.fail_after(5):
                await dns.wait_for_query(f"_dmarc.{GOOD}", "TXT")
            await in_thread(lambda: smtp.send(body[100:] + b".\r\n"))
            reply = code_of(*await in_thread(smtp.getreply))[0]
        finally:
            await in_thread(smtp.close)

    assert reply == QUEUED
    assert fields(only_result(mx)) == {"spf": "pass", "dkim": "none", "dmarc": "pass"}


async def test_spooled_message_is_verified(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account, rsa_key: Key
) -> None:
    publish(dns, rsa_key, domain=BANK)
    body = "The quick brown fox jumps over the lazy dog.\r\n" * 2000
    raw = sign(message(f"security@{BANK}", body=body), rsa_key, domain=BANK)
    async with mx_server(tmp_path, store, dns, "Smtp:SpoolThresholdBytes=4096") as mx:
        reply, _ = await mx.send(raw, mail_from=f"x@{BANK}")

    assert reply == QUEUED
    assert fields(only_result(mx)) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}


async def test_one_result_line_per_message(
    tmp_path: Path, store: SqliteStore, dns: DnsServer, alice: Account
) -> None:
    def session(port: int) -> list[int]:
        codes = []
        with client(port) as smtp:
            smtp.ehlo("mail.sender.example")
            for n in range(3):
                smtp.mail(f"x@{GOOD}")
                smtp.rcpt(ALICE)
                codes.append(smtp.data(message(f"n{n}@{GOOD}"))[0])
            smtp.mail(f"x@{GOOD}")
            smtp.rset()  # a transaction without a message: nothing to report
        return codes

    async with mx_server(tmp_path, store, dns) as mx:
        codes = await in_thread(lambda: session(mx.port))

    assert codes == [250, 250, 250]
    assert len(mx.results()) == 3
