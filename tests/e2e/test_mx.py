"""The MX endpoint over real sockets: inbound mail for hosted domains, never a relay.

SPEC §1, §4, §5 and §10. Every table runs against one server per configuration;
each case opens its own connection so a syntax error in one case cannot count
towards ``Smtp:MaxErrors`` in another. Accepted transactions go through DATA and are
found in the store; rejected ones end with DATA refused and nothing stored.
"""

from __future__ import annotations

import functools
import re
import smtplib
import sqlite3
import ssl
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, closing
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import attrs
import pytest
import trio

from relate_smtp.config import ConfigError, Settings
from relate_smtp.storage import NewEmail, SavedEmail, StoreError, StoreUnavailable, User
from relate_smtp.storage.records import RECIPIENT_BCC, RECIPIENT_CC, RECIPIENT_TO, RecipientRow
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    Account,
    RunningServer,
    add_account,
    client,
    client_over_tls,
    free_port,
    in_thread,
    make_settings,
    running_server,
)

HOSTED = "hosted.example"
FOREIGN = "foreign.example"
ALICE = f"alice@{HOSTED}"
ALICE_ALIAS = f"alice.alias@{HOSTED}"
ALICE_UNVERIFIED = f"alice.unverified@{HOSTED}"
BOB = f"bob@{HOSTED}"

Code = tuple[int, str]  # (reply code, enhanced status code or "")

OK_SENDER: Code = (250, "2.1.0")
OK_RCPT: Code = (250, "2.1.5")
QUEUED: Code = (250, "2.0.0")
RELAY_DENIED: Code = (550, "5.7.1")
UNKNOWN_USER: Code = (550, "5.1.1")
AUTH_REQUIRED: Code = (530, "5.7.0")
SENDER_NOT_OWNED: Code = (553, "5.7.1")
LOCAL_ERROR: Code = (451, "4.3.0")
BAD_SEQUENCE: Code = (503, "5.5.1")
NOT_IMPLEMENTED: Code = (502, "5.5.1")
# Rejected by the protocol core's syntax check, before the policy sees the path.
SYNTAX: Code = (501, "5.1.3")
NOT_UTF8: Code = (501, "5.5.4")
NEEDS_SMTPUTF8: Code = (553, "5.6.7")
UNKNOWN_PARAMETER: Code = (555, "5.5.4")

_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")


def code_of(reply: tuple[int, bytes]) -> Code:
    code, text = reply
    first = text.split(b" ", 1)[0]
    return code, first.decode() if _ENHANCED.fullmatch(first) else ""


def mx_settings(tmp_path: Path, *overrides: str) -> Settings:
    return make_settings(
        tmp_path,
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:Port=0",
        f"Smtp:Mx:HostedDomains:0={HOSTED}",
        *overrides,
    )


def message(to: Sequence[str] = (ALICE,), cc: Sequence[str] = (), subject: str = "Hi") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Sender <sender@{FOREIGN}>"
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4()}@{FOREIGN}>"
    msg.set_content("Hello.\n")
    return msg.as_bytes()


def send_data(smtp: smtplib.SMTP, raw: bytes) -> Code:
    """DATA with the message when the server says 354; its final reply, or DATA's own."""
    try:
        return code_of(smtp.data(raw))
    except smtplib.SMTPDataError as exc:
        text = exc.smtp_error if isinstance(exc.smtp_error, bytes) else exc.smtp_error.encode()
        return code_of((exc.smtp_code, text))


def connect(listener: str, port: int, tls: ssl.SSLContext) -> smtplib.SMTP:
    """A client for a listener by its name: implicit TLS for ``submission-tls``."""
    if listener == "submission-tls":
        return client_over_tls(port, tls)
    return client(port)


def raw_command(smtp: smtplib.SMTP, line: bytes) -> Code:
    """A command line sent byte for byte (smtplib would encode or quote it)."""
    smtp.send(line + b"\r\n")
    return code_of(smtp.getreply())


async def add_unverified_alias(db: Path, user: User, address: str) -> None:
    """A ``UserEmailAddresses`` row with ``IsVerified`` = false (the CLI makes verified
    ones only), written the way the platform writes it."""

    def work() -> None:
        with closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute(
                'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified",'
                ' "AddedAt") VALUES (?, ?, ?, 0, ?)',
                (str(uuid.uuid4()), str(user.id), address, datetime.now(UTC).isoformat()),
            )

    await trio.to_thread.run_sync(work)


@attrs.frozen
class People:
    alice: Account
    bob: Account


async def add_people(tmp_path: Path, store: SqliteStore) -> People:
    alice = await add_account(store, ALICE, aliases=[ALICE_ALIAS])
    bob = await add_account(store, BOB)
    await add_unverified_alias(tmp_path / "relate.db", alice.user, ALICE_UNVERIFIED)
    return People(alice=alice, bob=bob)


async def stored_count(store: SqliteStore) -> int:
    return len(await store.list_emails(1000))


@attrs.define
class RecordingListener:
    """Stands in for the notifier: the user ids each stored message would notify."""

    notified: list[tuple[uuid.UUID, ...]] = attrs.Factory(list)

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        self.notified.append(saved.linked_user_ids)


def serve(
    settings: Settings,
    store: SqliteStore,
    *,
    tls_context: ssl.SSLContext | None = None,
    recorder: RecordingListener | None = None,
) -> AbstractAsyncContextManager[RunningServer]:
    """The test server with notifications recorded instead of posted: no API listens
    in tests, and the notifier's retries would hold shutdown for seconds."""
    return running_server(
        settings,
        store,
        tls_context=tls_context,
        new_mail_listener=recorder if recorder is not None else RecordingListener(),
    )


# ---- SPEC §4: the decision table on all three listeners ----------------------------------


@attrs.frozen
class Outcome:
    """What one transaction got: MAIL, RCPT to a foreign address, to a hosted user, to
    an unknown user at a hosted domain, the final reply, and how many e-mails it
    stored."""

    mail: Code
    foreign: Code
    user: Code
    unknown: Code
    data: Code
    stored: int


ACCEPT_ALL = Outcome(OK_SENDER, OK_RCPT, OK_RCPT, OK_RCPT, QUEUED, 1)
NEED_AUTH = Outcome(AUTH_REQUIRED, BAD_SEQUENCE, BAD_SEQUENCE, BAD_SEQUENCE, BAD_SEQUENCE, 0)
INBOUND = Outcome(OK_SENDER, RELAY_DENIED, OK_RCPT, UNKNOWN_USER, QUEUED, 1)

# (Smtp:Mx:Enabled, Smtp:RequireAuthentication) → {(listener, authenticated): outcome}.
# An authenticated MX session has done STARTTLS first: port 25 offers AUTH only over TLS.
DECISION_TABLE: dict[tuple[bool, bool], dict[tuple[str, bool], Outcome]] = {
    (False, True): {
        ("submission", False): NEED_AUTH,
        ("submission", True): ACCEPT_ALL,
        ("submission-tls", False): NEED_AUTH,
        ("submission-tls", True): ACCEPT_ALL,
    },
    (False, False): {  # an open sink, as the original
        ("submission", False): ACCEPT_ALL,
        ("submission", True): ACCEPT_ALL,
        ("submission-tls", False): ACCEPT_ALL,
        ("submission-tls", True): ACCEPT_ALL,
    },
    (True, True): {
        ("submission", False): NEED_AUTH,
        ("submission", True): ACCEPT_ALL,
        ("submission-tls", False): NEED_AUTH,
        ("submission-tls", True): ACCEPT_ALL,
        ("mx", False): INBOUND,
        ("mx", True): ACCEPT_ALL,
    },
    (True, False): {  # MX on: submission needs AUTH whatever RequireAuthentication says
        ("submission", False): NEED_AUTH,
        ("submission", True): ACCEPT_ALL,
        ("submission-tls", False): NEED_AUTH,
        ("submission-tls", True): ACCEPT_ALL,
        ("mx", False): INBOUND,
        ("mx", True): ACCEPT_ALL,
    },
}


@pytest.mark.parametrize(
    ("mx_enabled", "require_auth"),
    list(DECISION_TABLE),
    ids=lambda value: str(value).lower(),
)
async def test_decision_table_on_every_listener(
    tmp_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    mx_enabled: bool,
    require_auth: bool,
) -> None:
    people = await add_people(tmp_path, store)
    settings = make_settings(
        tmp_path,
        f"Smtp:SecurePort={free_port()}",
        f"Smtp:RequireAuthentication={str(require_auth).lower()}",
        f"Smtp:Mx:Enabled={str(mx_enabled).lower()}",
        "Smtp:Mx:Port=0",
        f"Smtp:Mx:HostedDomains:0={HOSTED}",
    )
    expected = DECISION_TABLE[mx_enabled, require_auth]
    actual: dict[tuple[str, bool], Outcome] = {}
    async with serve(settings, store, tls_context=server_tls) as running:
        names = {item.name for item in running.bound}
        assert ("mx" in names) is mx_enabled
        for listener, authenticated in expected:
            port = running.port(listener)

            def transaction(
                listener: str = listener, authenticated: bool = authenticated, port: int = port
            ) -> tuple[Code, Code, Code, Code, Code]:
                with connect(listener, port, client_tls) as smtp:
                    smtp.ehlo("client.example")
                    sender = f"sender@{FOREIGN}"
                    if authenticated:
                        if listener == "mx":
                            smtp.starttls(context=client_tls)
                            smtp.ehlo("client.example")
                        smtp.login(ALICE, people.alice.key)
                        sender = ALICE
                    mail = code_of(smtp.docmd("MAIL", f"FROM:<{sender}>"))
                    foreign, user, unknown = (
                        code_of(smtp.docmd("RCPT", f"TO:<{rcpt}>"))
                        for rcpt in (f"someone@{FOREIGN}", BOB, f"nobody@{HOSTED}")
                    )
                    return mail, foreign, user, unknown, send_data(smtp, message(to=[BOB]))

            before = await stored_count(store)
            mail, foreign, user, unknown, data = await in_thread(transaction)
            stored = await stored_count(store) - before
            actual[listener, authenticated] = Outcome(mail, foreign, user, unknown, data, stored)
    assert actual == expected


async def test_mx_unknown_recipient_accepted_without_validation(
    tmp_path: Path, store: SqliteStore
) -> None:
    """ValidateRecipients=false: any local part at a hosted domain is accepted (stored,
    linked to nobody); an unverified alias still links its user (a Bcc row, as no header
    names it); foreign domains are still refused."""
    people = await add_people(tmp_path, store)
    settings = mx_settings(tmp_path, "Smtp:Mx:ValidateRecipients=false")
    async with serve(settings, store) as running:
        port = running.port("mx")

        def transaction() -> list[Code]:
            with client(port) as smtp:
                smtp.ehlo("mx.foreign.example")
                codes = [code_of(smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}>"))]
                for rcpt in (f"nobody@{HOSTED}", ALICE_UNVERIFIED, f"alice@{FOREIGN}"):
                    codes.append(code_of(smtp.docmd("RCPT", f"TO:<{rcpt}>")))
                codes.append(send_data(smtp, message(to=[f"nobody@{HOSTED}"])))
                return codes

        codes = await in_thread(transaction)
    assert codes == [OK_SENDER, OK_RCPT, OK_RCPT, RELAY_DENIED, QUEUED]
    emails = await store.list_emails(10)
    assert len(emails) == 1
    full = await store.get_email(emails[0].id)
    assert full is not None
    assert rows(full.recipients) == {
        (f"nobody@{HOSTED}", RECIPIENT_TO, None),
        (ALICE_UNVERIFIED, RECIPIENT_BCC, people.alice.user.id),
    }


# ---- relay tricks ---------------------------------------------------------------------


@attrs.frozen
class Trick:
    name: str
    rcpt: bytes  # the RCPT TO argument, exactly as sent
    expected: Code  # with ValidateRecipients=true
    smtputf8: bool = False


def trick(name: str, rcpt: str | bytes, expected: Code, *, smtputf8: bool = False) -> Trick:
    raw = rcpt.encode() if isinstance(rcpt, str) else rcpt
    return Trick(name=name, rcpt=raw, expected=expected, smtputf8=smtputf8)


TRICKS = [
    # Refused by the policy (550): the path is valid RFC 5321 syntax.
    trick("percent hack", f"<alice%{FOREIGN}@{HOSTED}>", RELAY_DENIED),
    trick("percent hack to postmaster", f"<postmaster%{FOREIGN}@{HOSTED}>", RELAY_DENIED),
    trick("bang path", f"<{FOREIGN}!alice@{HOSTED}>", RELAY_DENIED),
    trick("source route via hosted", f"<@{HOSTED}:alice@{FOREIGN}>", RELAY_DENIED),
    trick("source route, two hops", f"<@x.example,@{HOSTED}:alice@{FOREIGN}>", RELAY_DENIED),
    trick("source route to hosted", f"<@{FOREIGN}:alice@{HOSTED}>", RELAY_DENIED),
    trick("quoted @", f'<"alice@{FOREIGN}"@{HOSTED}>', RELAY_DENIED),
    trick("quoted %", f'<"alice%{FOREIGN}"@{HOSTED}>', RELAY_DENIED),
    trick("quoted !", f'<"{FOREIGN}!alice"@{HOSTED}>', RELAY_DENIED),
    trick("escaped @ in quotes", f'<"alice\\@{FOREIGN}"@{HOSTED}>', RELAY_DENIED),
    trick("escaped quote in quotes", f'<"alice\\"@{FOREIGN}"@{HOSTED}>', RELAY_DENIED),
    trick("IPv4 literal", "<alice@[127.0.0.1]>", RELAY_DENIED),
    trick("IPv6 literal", "<alice@[IPv6:::1]>", RELAY_DENIED),
    trick("postmaster at a literal", "<postmaster@[127.0.0.1]>", RELAY_DENIED),
    trick("subdomain", f"<alice@sub.{HOSTED}>", RELAY_DENIED),
    trick("suffix", f"<alice@x{HOSTED}>", RELAY_DENIED),
    trick("hosted as a label", f"<alice@{HOSTED}.{FOREIGN}>", RELAY_DENIED),
    trick("foreign domain", f"<alice@{FOREIGN}>", RELAY_DENIED),
    trick("postmaster at foreign", f"<postmaster@{FOREIGN}>", RELAY_DENIED),
    trick("Cyrillic o", "<alice@h\u043ested.example>", RELAY_DENIED, smtputf8=True),
    trick(
        "full-width",
        "<alice@\uff48\uff4f\uff53\uff54\uff45\uff44.example>",
        RELAY_DENIED,
        smtputf8=True,
    ),
    trick("ideographic full stop", "<alice@hosted\u3002example>", RELAY_DENIED, smtputf8=True),
    trick("punycode look-alike", "<alice@xn--hsted-3ve.example>", RELAY_DENIED),
    # The domain is hosted, the mailbox is no user (ValidateRecipients answers 550 5.1.1).
    trick("escaped letter in quotes", f'<"al\\ice"@{HOSTED}>', UNKNOWN_USER),
    trick("quoted plain local part", f'<"alice"@{HOSTED}>', UNKNOWN_USER),
    trick("Cyrillic a in local part", f"<\u0430lice@{HOSTED}>", UNKNOWN_USER, smtputf8=True),
    # Refused by the protocol core's syntax check (501 and friends).
    trick("several @", f"<alice@{FOREIGN}@{HOSTED}>", SYNTAX),
    trick("double @", f"<alice@@{HOSTED}>", SYNTAX),
    trick("trailing dot", f"<alice@{HOSTED}.>", SYNTAX),
    trick("trailing dot, foreign", f"<alice@{FOREIGN}.>", SYNTAX),
    trick("percent in the domain", f"<alice@{FOREIGN}%{HOSTED}>", SYNTAX),
    trick("invalid literal", "<alice@[999.0.0.1]>", SYNTAX),
    trick("empty local part", f"<@{HOSTED}>", SYNTAX),
    trick("no angle brackets", f"alice@{HOSTED}", SYNTAX),
    trick("space before @", f"alice @{HOSTED}", SYNTAX),
    trick("space inside brackets", f"<alice@{HOSTED} >", SYNTAX),
    trick("space after <", f"< alice@{HOSTED}>", SYNTAX),
    trick("comment in local part", f"<alice(x)@{HOSTED}>", SYNTAX),
    trick("comment in domain", f"<alice@{HOSTED}(x)>", SYNTAX),
    trick("nested brackets", f"<<alice@{HOSTED}>>", SYNTAX),
    trick("null path", "<>", SYNTAX),
    trick("NUL in local part", f"<alice\x00@{HOSTED}>", SYNTAX),
    trick("NUL in quotes", f'<"alice\x00"@{HOSTED}>', SYNTAX),
    trick("escaped NUL in quotes", f'<"alice\\\x00"@{HOSTED}>', SYNTAX),
    trick("comment after the path", f"<alice@{HOSTED}> (comment)", UNKNOWN_PARAMETER),
    trick("second path after the path", f"<alice@{HOSTED}> <a@{FOREIGN}>", UNKNOWN_PARAMETER),
    trick("invalid UTF-8", b"<alice\xff@" + HOSTED.encode() + b">", NOT_UTF8),
    trick("Latin-1 domain", b"<alice@hosted\xe9.example>", NOT_UTF8),
    trick("Cyrillic o without SMTPUTF8", "<alice@h\u043ested.example>", NEEDS_SMTPUTF8),
]


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
async def test_relay_tricks_are_refused_and_store_nothing(
    tmp_path: Path, store: SqliteStore, validate: bool
) -> None:
    """Every trick gets a 5xx and DATA after it is refused. Without ValidateRecipients the
    forms that only name an unknown mailbox at the hosted domain are accepted (the user
    check is what refused them); every relay and syntax rejection stays."""
    await add_people(tmp_path, store)
    settings = mx_settings(tmp_path, f"Smtp:Mx:ValidateRecipients={str(validate).lower()}")
    async with serve(settings, store) as running:
        port = running.port("mx")

        def attempt(case: Trick) -> tuple[Code, Code]:
            with client(port) as smtp:
                smtp.ehlo("mx.foreign.example")
                params = " SMTPUTF8" if case.smtputf8 else ""
                assert code_of(smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}>{params}")) == OK_SENDER
                rcpt = raw_command(smtp, b"RCPT TO:" + case.rcpt)
                if rcpt[0] < 400:
                    return rcpt, code_of(smtp.docmd("RSET"))
                return rcpt, code_of(smtp.docmd("DATA"))

        def run_all() -> dict[str, tuple[Code, Code]]:
            return {case.name: attempt(case) for case in TRICKS}

        actual = await in_thread(run_all)
    expected = {
        case.name: (OK_RCPT, (250, "2.0.0"))
        if not validate and case.expected == UNKNOWN_USER
        else (case.expected, BAD_SEQUENCE)
        for case in TRICKS
    }
    assert actual == expected
    assert await stored_count(store) == 0


# ---- accepted forms, and where they land -----------------------------------------------


async def test_accepted_forms_are_stored_and_linked(tmp_path: Path, store: SqliteStore) -> None:
    """Case differences, verified aliases, ``postmaster`` (no user needed) and the null
    sender are accepted; each message lands linked to the right user or to nobody."""
    people = await add_people(tmp_path, store)
    alice = people.alice.user.id
    cases: list[tuple[str, str, Code, tuple[uuid.UUID, ...]]] = [
        # (MAIL FROM path, RCPT TO path, RCPT reply, linked users of the stored e-mail)
        (f"<sender@{FOREIGN}>", f"<{ALICE}>", OK_RCPT, (alice,)),
        (f"<sender@{FOREIGN}>", "<ALICE@HOSTED.EXAMPLE>", OK_RCPT, (alice,)),
        (f"<sender@{FOREIGN}>", f"<{ALICE_ALIAS}>", OK_RCPT, (alice,)),
        (f"<sender@{FOREIGN}>", f"<{ALICE_ALIAS.upper()}>", OK_RCPT, (alice,)),
        ("<>", f"<{ALICE}>", OK_RCPT, (alice,)),
        ("<>", "<postmaster>", OK_RCPT, ()),
        (f"<sender@{FOREIGN}>", "<Postmaster>", OK_RCPT, ()),
        (f"<sender@{FOREIGN}>", f"<postmaster@{HOSTED}>", OK_RCPT, ()),
        (f"<sender@{FOREIGN}>", "<POSTMASTER@Hosted.Example>", OK_RCPT, ()),
    ]
    settings = mx_settings(tmp_path)
    recorder = RecordingListener()
    async with serve(settings, store, recorder=recorder) as running:
        port = running.port("mx")

        def deliver(sender: str, rcpt: str, subject: str) -> tuple[Code, Code, Code]:
            with client(port) as smtp:
                smtp.ehlo("mx.foreign.example")
                mail = code_of(smtp.docmd("MAIL", f"FROM:{sender}"))
                rcpt_code = code_of(smtp.docmd("RCPT", f"TO:{rcpt}"))
                return mail, rcpt_code, send_data(smtp, message(to=[], subject=subject))

        for index, (sender, rcpt, rcpt_code, linked) in enumerate(cases):
            subject = f"case {index}"
            got = await in_thread(functools.partial(deliver, sender, rcpt, subject))
            assert got == (OK_SENDER, rcpt_code, QUEUED), (sender, rcpt)
            assert recorder.notified[-1] == linked, (sender, rcpt)
    assert len(recorder.notified) == len(cases)
    assert await stored_count(store) == len(cases)


async def test_unverified_alias_is_accepted_and_linked(tmp_path: Path, store: SqliteStore) -> None:
    """SPEC §4/§5: the platform adds additional addresses unverified and cannot verify
    them, and the original's GetByEmailAsync ignores IsVerified: RCPT is accepted with
    ValidateRecipients, the row is linked to the owner and the notification names them."""
    people = await add_people(tmp_path, store)
    alice = people.alice.user.id
    recorder = RecordingListener()
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(
            running, [ALICE_UNVERIFIED.upper()], message(to=[ALICE_UNVERIFIED])
        )
    assert (codes, data) == ([OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {(ALICE_UNVERIFIED, RECIPIENT_TO, alice)}
    assert recorder.notified == [(alice,)]


async def test_primary_address_beats_another_users_unverified_alias(
    tmp_path: Path, store: SqliteStore
) -> None:
    """SPEC §4: bob's primary address belongs to bob even when alice lists it."""
    people = await add_people(tmp_path, store)
    await add_unverified_alias(tmp_path / "relate.db", people.alice.user, BOB.upper())
    recorder = RecordingListener()
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(running, [BOB], message(to=[BOB]))
    assert (codes, data) == ([OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {(BOB, RECIPIENT_TO, people.bob.user.id)}
    assert recorder.notified == [(people.bob.user.id,)]


# ---- internationalised hosted domains -----------------------------------------------

IDN_U = "ex\u00e4mple.test"  # U-label form, as a user may have typed it
IDN_A = "xn--exmple-cua.test"  # the same name in A-label form


async def deliver_idn(
    tmp_path: Path, store: SqliteStore, rcpt: str
) -> tuple[Code, Code, list[tuple[uuid.UUID, ...]]]:
    settings = make_settings(
        tmp_path,
        "Smtp:Mx:Enabled=true",
        "Smtp:Mx:Port=0",
        f"Smtp:Mx:HostedDomains:0={IDN_U}",
    )
    recorder = RecordingListener()
    async with serve(settings, store, recorder=recorder) as running:
        port = running.port("mx")

        def transaction() -> tuple[Code, Code]:
            with client(port) as smtp:
                smtp.command_encoding = "utf-8"
                smtp.ehlo("mx.foreign.example")
                smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}> SMTPUTF8")
                return code_of(smtp.docmd("RCPT", f"TO:<{rcpt}>")), send_data(smtp, message(to=[]))

        rcpt_code, data = await in_thread(transaction)
    return rcpt_code, data, recorder.notified


async def test_idn_user_reached_in_the_form_stored(tmp_path: Path, store: SqliteStore) -> None:
    """A user kept under the U-label is found and linked when the envelope uses it."""
    dora = await add_account(store, f"dora@{IDN_U}")
    rcpt, data, notified = await deliver_idn(tmp_path, store, f"dora@{IDN_U}")
    assert (rcpt, data) == (OK_RCPT, QUEUED)
    assert notified == [(dora.user.id,)]


@pytest.mark.parametrize(
    ("stored", "written"),
    [(f"dora@{IDN_A}", f"dora@{IDN_U}"), (f"dora@{IDN_U}", f"dora@{IDN_A}")],
    ids=["stored-A-written-U", "stored-U-written-A"],
)
async def test_idn_user_reached_in_the_other_label_form(
    tmp_path: Path, store: SqliteStore, stored: str, written: str
) -> None:
    dora = await add_account(store, stored)
    rcpt, data, notified = await deliver_idn(tmp_path, store, written)
    assert (rcpt, data) == (OK_RCPT, QUEUED)
    assert notified == [(dora.user.id,)]


# ---- database errors ---------------------------------------------------------------------


class FailingLookups(SqliteStore):
    """The real store, except that the recipient lookup fails like a database outage."""

    failure: StoreError = StoreUnavailable("database is down")

    async def find_user_by_address(self, address: str) -> User | None:
        raise self.failure


@pytest.mark.parametrize(
    "failure",
    [StoreUnavailable("database is down"), StoreError("unexpected database error")],
    ids=["unavailable", "other-error"],
)
async def test_database_error_during_rcpt_is_temporary(tmp_path: Path, failure: StoreError) -> None:
    """451 4.3.0 (the sender retries), never a 5xx that would bounce mail for a real
    user; the session goes on, and checks that need no database still answer."""
    failing = await FailingLookups.open(str(tmp_path / "relate.db"))
    assert isinstance(failing, FailingLookups)
    failing.failure = failure
    try:
        await add_account(failing, ALICE)
        async with serve(mx_settings(tmp_path), failing) as running:
            port = running.port("mx")

            def transaction() -> list[Code]:
                with client(port) as smtp:
                    smtp.ehlo("mx.foreign.example")
                    return [
                        code_of(smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}>")),
                        code_of(smtp.docmd("RCPT", f"TO:<{ALICE}>")),
                        code_of(smtp.docmd("RCPT", f"TO:<alice@{FOREIGN}>")),
                        code_of(smtp.docmd("DATA")),
                        code_of(smtp.docmd("NOOP")),
                    ]

            codes = await in_thread(transaction)
        assert codes == [OK_SENDER, LOCAL_ERROR, RELAY_DENIED, BAD_SEQUENCE, (250, "2.0.0")]
        assert len(await failing.list_emails(10)) == 0
    finally:
        await failing.aclose()


# ---- TLS and AUTH on the MX listener ---------------------------------------------------


ENCRYPTION_REQUIRED: Code = (538, "5.7.11")


async def test_mx_offers_auth_only_after_starttls(
    tmp_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    """SPEC §1: port 25 never takes a password in plaintext; after STARTTLS it offers
    AUTH, as the original did, and an authenticated session may relay like submission."""
    people = await add_people(tmp_path, store)
    async with serve(mx_settings(tmp_path), store, tls_context=server_tls) as running:
        mx = next(item for item in running.bound if item.name == "mx")
        assert mx.tls == "starttls"

        def session() -> tuple[set[str], Code, Code, str, Code, Code, Code, Code, bool]:
            with client(mx.port) as smtp:
                smtp.ehlo("mx.foreign.example")
                before = set(smtp.esmtp_features)
                plaintext_auth = code_of(smtp.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA=="))
                starttls = code_of(smtp.starttls(context=client_tls))
                smtp.ehlo("mx.foreign.example")
                mechanisms = smtp.esmtp_features.get("auth", "")
                login = code_of(smtp.login(ALICE, people.alice.key))
                mail = code_of(smtp.docmd("MAIL", f"FROM:<{ALICE}>"))
                foreign = code_of(smtp.docmd("RCPT", f"TO:<someone@{FOREIGN}>"))
                data = send_data(smtp, message(to=[f"someone@{FOREIGN}"]))
                encrypted = isinstance(smtp.sock, ssl.SSLSocket)
                return (
                    before,
                    plaintext_auth,
                    starttls,
                    mechanisms,
                    login,
                    mail,
                    foreign,
                    data,
                    encrypted,
                )

        result = await in_thread(session)
    before, plaintext_auth, starttls, mechanisms, login, mail, foreign, data, encrypted = result
    assert "starttls" in before
    assert "auth" not in before
    assert plaintext_auth == ENCRYPTION_REQUIRED
    assert starttls == (220, "2.0.0")
    assert encrypted
    assert set(mechanisms.split()) == {"PLAIN", "LOGIN"}
    assert login == (235, "2.7.0")
    assert (mail, foreign, data) == (OK_SENDER, OK_RCPT, QUEUED)
    [email] = await store.list_emails(10)
    assert email.sent_by_user_id == people.alice.user.id
    full = await store.get_email(email.id)
    assert full is not None
    assert [(r.address, r.user_id) for r in full.recipients] == [(f"someone@{FOREIGN}", None)]


async def test_mx_after_starttls_without_auth_is_still_inbound_only(
    tmp_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    people = await add_people(tmp_path, store)
    async with serve(mx_settings(tmp_path), store, tls_context=server_tls) as running:
        port = running.port("mx")

        def session() -> tuple[Code, Code, Code, Code]:
            with client(port) as smtp:
                smtp.starttls(context=client_tls)
                smtp.ehlo("mx.foreign.example")
                mail = code_of(smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}>"))
                foreign = code_of(smtp.docmd("RCPT", f"TO:<someone@{FOREIGN}>"))
                hosted = code_of(smtp.docmd("RCPT", f"TO:<{ALICE}>"))
                return mail, foreign, hosted, send_data(smtp, message())

        mail, foreign, hosted, data = await in_thread(session)
    assert (mail, foreign, hosted, data) == (OK_SENDER, RELAY_DENIED, OK_RCPT, QUEUED)
    [email] = await store.list_emails(10)
    assert email.sent_by_user_id is None
    full = await store.get_email(email.id)
    assert full is not None
    assert [r.user_id for r in full.recipients] == [people.alice.user.id]


async def test_mx_without_certificate_offers_no_starttls(
    tmp_path: Path, store: SqliteStore
) -> None:
    async with serve(mx_settings(tmp_path), store) as running:
        mx = next(item for item in running.bound if item.name == "mx")
        assert mx.tls == "none"

        def session() -> tuple[set[str], Code]:
            with client(mx.port) as smtp:
                smtp.ehlo("mx.foreign.example")
                return set(smtp.esmtp_features), code_of(smtp.docmd("STARTTLS"))

        features, starttls = await in_thread(session)
    assert "starttls" not in features
    assert "auth" not in features
    assert starttls[0] >= 500


# ---- envelope truth (SPEC §5, §10) -----------------------------------------------------


def rows(recipients: Sequence[RecipientRow]) -> set[tuple[str, str, uuid.UUID | None]]:
    return {(r.address.lower(), r.type, r.user_id) for r in recipients}


async def deliver_on_mx(
    running: RunningServer, envelope: Sequence[str], raw: bytes
) -> tuple[list[Code], Code]:
    port = running.port("mx")

    def transaction() -> tuple[list[Code], Code]:
        with client(port) as smtp:
            smtp.ehlo("mx.foreign.example")
            smtp.docmd("MAIL", f"FROM:<sender@{FOREIGN}>")
            codes = [code_of(smtp.docmd("RCPT", f"TO:<{rcpt}>")) for rcpt in envelope]
            return codes, send_data(smtp, raw)

    return await in_thread(transaction)


async def only_email_rows(store: SqliteStore) -> set[tuple[str, str, uuid.UUID | None]]:
    emails = await store.list_emails(10)
    assert len(emails) == 1
    full = await store.get_email(emails[0].id)
    assert full is not None
    return rows(full.recipients)


async def test_envelope_only_recipient_gets_linked_bcc_row(
    tmp_path: Path, store: SqliteStore
) -> None:
    people = await add_people(tmp_path, store)
    recorder = RecordingListener()
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(running, [BOB], message(to=[f"list@{FOREIGN}"]))
    assert (codes, data) == ([OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {
        (f"list@{FOREIGN}", RECIPIENT_TO, None),
        (BOB, RECIPIENT_BCC, people.bob.user.id),
    }
    assert recorder.notified == [(people.bob.user.id,)]


async def test_header_alone_never_delivers_to_a_local_user(
    tmp_path: Path, store: SqliteStore
) -> None:
    people = await add_people(tmp_path, store)
    recorder = RecordingListener()
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(running, [BOB], message(to=[ALICE]))
    assert (codes, data) == ([OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {
        (ALICE, RECIPIENT_TO, None),
        (BOB, RECIPIENT_BCC, people.bob.user.id),
    }
    assert recorder.notified == [(people.bob.user.id,)]
    assert all(people.alice.user.id not in ids for ids in recorder.notified)


async def test_two_local_users_and_a_refused_foreign_one_make_one_email(
    tmp_path: Path, store: SqliteStore
) -> None:
    people = await add_people(tmp_path, store)
    alice, bob = people.alice.user.id, people.bob.user.id
    recorder = RecordingListener()
    foreign = f"mallory@{FOREIGN}"
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(
            running, [ALICE, foreign, BOB], message(to=[ALICE], cc=[foreign])
        )
    assert (codes, data) == ([OK_RCPT, RELAY_DENIED, OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {
        (ALICE, RECIPIENT_TO, alice),
        (foreign, RECIPIENT_CC, None),
        (BOB, RECIPIENT_BCC, bob),
    }
    assert len(recorder.notified) == 1
    assert sorted(recorder.notified[0]) == sorted((alice, bob))


async def test_alias_links_to_its_user_once(tmp_path: Path, store: SqliteStore) -> None:
    """Envelope to the verified alias, headers naming both addresses: one linked row."""
    people = await add_people(tmp_path, store)
    alice = people.alice.user.id
    recorder = RecordingListener()
    async with serve(mx_settings(tmp_path), store, recorder=recorder) as running:
        codes, data = await deliver_on_mx(
            running, [ALICE_ALIAS], message(to=[ALICE_ALIAS], cc=[ALICE])
        )
    assert (codes, data) == ([OK_RCPT], QUEUED)
    assert await only_email_rows(store) == {
        (ALICE_ALIAS, RECIPIENT_TO, alice),
        (ALICE, RECIPIENT_CC, None),
    }
    assert recorder.notified == [(alice,)]


# ---- start-up guard and sender login match ---------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ("Smtp:Mx:Enabled=true",),
        ("Smtp:Mx:Enabled=true", "Smtp:Mx:HostedDomains:0="),
        ("Smtp:Mx:Enabled=True", "Smtp:Mx:Port=0"),
    ],
)
def test_mx_without_hosted_domains_refuses_to_start(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(tmp_path, *overrides)
    assert caught.value.key == "Smtp:Mx:HostedDomains"
    assert "open relay" in str(caught.value)


async def test_mx_start_line_names_port_and_domains(
    tmp_path: Path, store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="relate_smtp.lifecycle")
    settings = mx_settings(tmp_path, "Smtp:Mx:HostedDomains:1=Mail.Hosted.Example.")
    async with serve(settings, store) as running:
        port = running.port("mx")
    messages = [record.getMessage() for record in caplog.records]
    assert (
        "MX endpoint enabled on port 0 for domains: hosted.example, mail.hosted.example" in messages
    )
    assert any(
        m.startswith("Listening: mx on ") and m.endswith(f":{port} (none)") for m in messages
    )


SENDERS: list[tuple[str, Code, Code]] = [
    # (MAIL FROM path, RestrictSenderToLogin=true, =false)
    (f"<{ALICE}>", OK_SENDER, OK_SENDER),
    ("<ALICE@Hosted.Example>", OK_SENDER, OK_SENDER),
    (f"<{ALICE_ALIAS}>", OK_SENDER, OK_SENDER),
    (f"<{ALICE_UNVERIFIED}>", OK_SENDER, OK_SENDER),
    (f"<{BOB}>", SENDER_NOT_OWNED, OK_SENDER),
    (f"<alice@{FOREIGN}>", SENDER_NOT_OWNED, OK_SENDER),
    (f"<alice%{FOREIGN}@{HOSTED}>", SENDER_NOT_OWNED, OK_SENDER),
    ("<>", SENDER_NOT_OWNED, OK_SENDER),
]


@pytest.mark.parametrize("restrict", [True, False], ids=["restrict", "any-sender"])
async def test_sender_login_match(
    tmp_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    restrict: bool,
) -> None:
    people = await add_people(tmp_path, store)
    settings = mx_settings(
        tmp_path,
        f"Smtp:SecurePort={free_port()}",
        f"Smtp:RestrictSenderToLogin={str(restrict).lower()}",
    )
    actual: dict[tuple[str, str], tuple[Code, int]] = {}
    expected: dict[tuple[str, str], tuple[Code, int]] = {}
    async with serve(settings, store, tls_context=server_tls) as running:
        for listener in ("submission", "submission-tls"):
            port = running.port(listener)

            def attempt(
                sender: str, listener: str = listener, port: int = port
            ) -> tuple[Code, Code]:
                with connect(listener, port, client_tls) as smtp:
                    smtp.ehlo("client.example")
                    smtp.login(ALICE, people.alice.key)
                    mail = code_of(smtp.docmd("MAIL", f"FROM:{sender}"))
                    smtp.docmd("RCPT", f"TO:<someone@{FOREIGN}>")
                    return mail, send_data(smtp, message(to=[f"someone@{FOREIGN}"]))

            for sender, when_restricted, when_open in SENDERS:
                before = await stored_count(store)
                mail, _ = await in_thread(functools.partial(attempt, sender))
                actual[listener, sender] = (mail, await stored_count(store) - before)
                want = when_restricted if restrict else when_open
                expected[listener, sender] = (want, 1 if want == OK_SENDER else 0)
    assert actual == expected
