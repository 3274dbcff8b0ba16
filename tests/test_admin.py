"""What the administrative commands print of stored and user-supplied text."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from relate_smtp import admin, cli
from relate_smtp.cli import printable
from relate_smtp.config import Settings, StorageSettings
from relate_smtp.handlers.message import build_email
from relate_smtp.storage import AddressTaken, TooLong
from relate_smtp.storage.sqlite import SqliteStore
from tests.storage.helpers import attachment, new_email, to

ESCAPED = [
    *"\x00\x07\t\n\r\x1b\x7f\x80\x85\x9b\x9f",
    *"\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    "\udcff",
]
KEY_NAME = "\x1b]0;pwned\x07\nlaptop"


def assert_terminal_safe(output: str) -> None:
    """Nothing but printable characters and the line breaks between output lines."""
    raw = {ch for ch in output if not ch.isprintable() and ch != "\n"}
    assert not raw, f"raw control characters reached the terminal: {raw!r}"


@pytest.mark.parametrize("char", ESCAPED)
def test_control_characters_are_shown_as_escapes(char: str) -> None:
    assert printable(f"a{char}b") == "a" + repr(char)[1:-1] + "b"


def test_escape_sequences_and_forged_lines_never_reach_the_terminal() -> None:
    assert printable("Hi \x1b[2J\x9b31m there\x07") == r"Hi \x1b[2J\x9b31m there\x07"
    assert printable("x.pdf\r\nFrom: forged") == r"x.pdf\r\nFrom: forged"
    assert printable("evil\u202efdp.exe") == r"evil\u202efdp.exe"


def test_text_and_bidi_marks_stay_and_escaping_twice_changes_nothing() -> None:
    text = "Zoë 日本 \u200f\u05e9\u05dc\u05d5\u05dd\u200e C:\\dir \\x1b"
    assert printable(text) == text
    assert printable(printable("a\n\x1b")) == printable("a\n\x1b")


def test_a_body_keeps_its_lines_and_tabs_only() -> None:
    body = "one\r\ntwo\tcol\nthree\rover\x1b[2J\u2028\u202e"
    assert printable(body, multiline=True) == "one\ntwo\tcol\nthree\\rover\\x1b[2J\\u2028\\u202e"


@pytest.fixture
def settings(db_path: Path) -> Settings:
    return Settings(storage=StorageSettings(sqlite_path=str(db_path)))


async def test_keys_list_escapes_stored_key_names(
    store: SqliteStore, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    user = await store.create_user("alice@example.com", display_name=None, aliases=[])
    await store.create_api_key(
        user.id,
        name=KEY_NAME,
        key_hash="hash",
        key_prefix="\x9b2Jprefix",
        scopes=json.dumps(["smtp\n"]),
    )

    await admin.keys_list(settings, "alice@example.com")

    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert_terminal_safe(out)
    assert r"\x1b]0;pwned\x07\nlaptop" in out and r"\x9b2Jprefix" in out


async def test_mail_list_prints_one_line_per_message(
    store: SqliteStore, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await store.save_email(new_email(from_address="a@x.test\nforged", subject="Hi\r\nThere\x1b"))
    await store.save_email(new_email(subject="second\u2028line"))

    await admin.mail_list(settings, 10)

    out = capsys.readouterr().out
    assert out.count("\n") == 2
    assert_terminal_safe(out)
    assert r"a@x.test\nforged" in out and r"Hi\r\nThere\x1b" in out


async def test_mail_show_escapes_every_field_and_keeps_the_body_lines(
    store: SqliteStore, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    email = new_email(
        from_display_name="Mallory\r\nSubject: forged",
        subject="Invoice\nFrom: boss@example.com",
        message_id="id\x1b[2J@x.test",
        header_recipients=(to("bob@example.org\nCc: forged"),),
        attachments=(attachment("report\u202efdp.exe\nFrom: forged", b"%PDF"),),
        text_body="line one\r\nline two\x1b]0;pwned\x07",
    )
    await store.save_email(email)

    await admin.mail_show(settings, email.id)

    lines = capsys.readouterr().out.splitlines()
    # 8 header lines, 1 recipient, 1 attachment, the blank line, 2 body lines.
    assert len(lines) == 13
    assert_terminal_safe("\n".join(lines))
    forged = ("From: forged", "From: boss", "Cc: forged", "Subject: forged")
    assert not any(line.startswith(forged) for line in lines)
    assert lines[2] == r"From:        Mallory\r\nSubject: forged <sender@sender.example>"
    assert lines[9].startswith(r"Attachment:  report\u202efdp.exe\nFrom: forged (")
    assert lines[11:] == ["line one", r"line two\x1b]0;pwned\x07"]


async def test_mail_show_escapes_a_decoded_attachment_file_name(
    store: SqliteStore, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = (
        b"From: a@x.test\r\nTo: b@x.test\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''x.pdf%0AFrom%3A%20forged\r\n"
        b"\r\n%PDF\r\n--b--\r\n"
    )
    email = build_email(
        raw, envelope_recipients=["b@x.test"], sent_by_user_id=None, max_attachment_size=1000
    )
    await store.save_email(email)

    await admin.mail_show(settings, email.id)

    lines = capsys.readouterr().out.splitlines()
    # 8 header lines, 1 recipient, 1 attachment, the blank line, 1 body line.
    assert len(lines) == 12
    assert_terminal_safe("\n".join(lines))
    assert lines[9].startswith("Attachment:  x.pdf") and lines[9].endswith("4 bytes)")


async def test_an_unknown_message_id_is_an_admin_error(
    store: SqliteStore, settings: Settings
) -> None:
    with pytest.raises(admin.AdminError):
        await admin.mail_show(settings, uuid.uuid4())


async def test_users_add_refuses_a_taken_address_with_a_typed_error(
    store: SqliteStore, settings: Settings
) -> None:
    await store.create_user("alice@example.com", display_name=None, aliases=[])

    with pytest.raises(AddressTaken, match=r"'ALICE@example\.com' already belongs to a user"):
        await admin.users_add(settings, "new@example.com", None, ["ALICE@example.com"])

    assert await store.find_user_by_address("new@example.com") is None


def test_the_cli_prints_store_errors_and_lets_bugs_surface(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async def too_long(_: Settings) -> None:
        raise TooLong("key name", 100)

    async def bug(_: Settings) -> None:
        raise ValueError("a bug")

    assert cli._run(too_long, settings) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "relate-smtp: key name: longer than 100 characters\n"
    with pytest.raises(ValueError, match="a bug"):
        cli._run(bug, settings)
