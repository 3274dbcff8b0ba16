"""Every field of SPEC §5, checked in the rows the real server stores after SMTP."""

from __future__ import annotations

import re
import smtplib
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from relate_smtp.storage import StoredEmail
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import Account, add_account, client, in_thread, make_settings, running_server


async def send(
    tmp_path: Path,
    store: SqliteStore,
    account: Account,
    messages: list[tuple[list[str], bytes]],
    *overrides: str,
) -> list[int]:
    """Send each (envelope recipients, raw message) in one session; the final codes."""
    async with running_server(make_settings(tmp_path, *overrides), store) as running:
        port = running.port("submission")

        def talk() -> list[int]:
            codes = []
            with client(port) as smtp:
                smtp.login(account.user.email, account.key)
                for rcpts, raw in messages:
                    try:
                        smtp.sendmail(account.user.email, rcpts, raw)
                        codes.append(250)
                    except smtplib.SMTPDataError as exc:
                        codes.append(exc.smtp_code)
                    except smtplib.SMTPSenderRefused as exc:
                        codes.append(exc.smtp_code)
                    smtp.rset()
            return codes

        return await in_thread(talk)


def as_sent(raw: bytes) -> bytes:
    """What the server keeps of ``raw`` sent by smtplib: smtplib adds CRLF unless the
    bytes already end with one, and the server stores bare LF line ends as CRLF."""
    sent = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    return re.sub(rb"\r\n|\n", b"\r\n", sent)


async def only_email(store: SqliteStore) -> StoredEmail:
    emails = await store.list_emails(10)
    assert len(emails) == 1
    full = await store.get_email(emails[0].id)
    assert full is not None
    return full


async def test_headers_bodies_and_recipients_are_stored(tmp_path: Path, store: SqliteStore) -> None:
    sender = await add_account(store, "alice@example.com", name="Alice")
    bob = await store.create_user("bob@example.com", display_name="Bob", aliases=["b@alias.test"])
    carol = await store.create_user("carol@example.com", display_name=None, aliases=())
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "Bob <b@alias.test>, Stranger <stranger@foreign.test>"
    msg["Cc"] = "Carol <carol@example.com>"
    msg["Subject"] = "Quarterly =?utf-8?q?r=C3=A9sum=C3=A9?="
    msg["Message-ID"] = "<q3-report@example.com>"
    msg.set_content("Plain body\n")
    msg.add_alternative("<p>HTML body</p>", subtype="html")
    raw = msg.as_bytes()
    # Carol is a Cc; Dave (no user) is Bcc only in the envelope.
    codes = await send(
        tmp_path,
        store,
        sender,
        [(["b@alias.test", "carol@example.com", "dave@foreign.test"], raw)],
    )
    assert codes == [250]
    email = await only_email(store)
    assert email.message_id == "q3-report@example.com"
    assert email.from_address == "alice@example.com"
    assert email.from_display_name == "Alice Example"
    assert email.subject == "Quarterly résumé"
    assert email.text_body is not None and email.text_body.strip() == "Plain body"
    assert email.html_body is not None and "<p>HTML body</p>" in email.html_body
    # As the original: the DATA block without the CRLF before the final dot.
    assert email.size_bytes == len(as_sent(raw)) - 2
    assert email.sent_by_user_id == sender.user.id
    assert email.in_reply_to is None and email.thread_id is None
    rows = {(r.type, r.address, r.user_id) for r in email.recipients}
    assert rows == {
        ("To", "b@alias.test", bob.id),
        ("To", "stranger@foreign.test", None),
        ("Cc", "carol@example.com", carol.id),
    }
    assert {r.display_name for r in email.recipients} == {"Bob", "Stranger", "Carol"}


async def test_defaults_threading_and_bcc(tmp_path: Path, store: SqliteStore) -> None:
    sender = await add_account(store, "alice@example.com")
    bob = await store.create_user("bob@example.com", display_name=None, aliases=())
    parent = (
        b"From: alice@example.com\r\nTo: x@foreign.test\r\nSubject: Parent\r\n"
        b"Message-ID: <parent@example.com>\r\n\r\nfirst\r\n"
    )
    reply = (
        b"From: alice@example.com\r\nTo: x@foreign.test\r\n"
        b"In-Reply-To: <parent@example.com>\r\n"
        b"References: <root@example.com> <parent@example.com>\r\n\r\nno subject here\r\n"
    )
    codes = await send(
        tmp_path,
        store,
        sender,
        [(["x@foreign.test"], parent), (["x@foreign.test", "bob@example.com"], reply)],
    )
    assert codes == [250, 250]
    emails = {e.subject: e for e in await store.list_emails(10)}
    stored_parent = await store.get_email(emails["Parent"].id)
    child = await store.get_email(emails["(No Subject)"].id)
    assert stored_parent is not None and child is not None
    uuid.UUID(child.message_id)  # no Message-ID header: a new UUID string
    assert child.in_reply_to == "parent@example.com"
    assert child.references == "<root@example.com> <parent@example.com>"
    assert child.thread_id == stored_parent.id
    assert child.text_body is not None and child.text_body.strip() == "no subject here"
    assert child.html_body is None
    # Bob is reached by the envelope alone: a linked Bcc row.
    assert {(r.type, r.address, r.user_id) for r in child.recipients} == {
        ("To", "x@foreign.test", None),
        ("Bcc", "bob@example.com", bob.id),
    }


async def test_attachments_are_decoded_and_named(tmp_path: Path, store: SqliteStore) -> None:
    sender = await add_account(store, "alice@example.com")
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "x@foreign.test"
    msg["Subject"] = "files"
    msg.set_content("see attached")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="r.pdf")
    msg.add_attachment(b"\x89PNG fake", maintype="image", subtype="png")  # no file name
    msg.add_attachment(b"inline logo", maintype="image", subtype="gif", disposition="inline")
    codes = await send(tmp_path, store, sender, [(["x@foreign.test"], msg.as_bytes())])
    assert codes == [250]
    email = await only_email(store)
    found = {(a.file_name, a.content_type, a.content) for a in email.attachments}
    assert found == {
        ("r.pdf", "application/pdf", b"%PDF-1.4 fake"),
        ("attachment.png", "image/png", b"\x89PNG fake"),
    }


@pytest.mark.parametrize("what", ["attachment", "message"])
async def test_oversized_mail_is_refused_and_nothing_stored(
    tmp_path: Path, store: SqliteStore, what: str
) -> None:
    sender = await add_account(store, "alice@example.com")
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "x@foreign.test"
    msg["Subject"] = "big"
    msg.set_content("body")
    msg.add_attachment(b"A" * 30_000, maintype="application", subtype="zip", filename="a.zip")
    limits = (
        ("Smtp:MaxAttachmentSizeBytes=20000",)
        if what == "attachment"
        else ("Smtp:MaxMessageSizeBytes=20000",)
    )
    codes = await send(tmp_path, store, sender, [(["x@foreign.test"], msg.as_bytes())], *limits)
    assert codes == [552]
    assert await store.list_emails(10) == []
