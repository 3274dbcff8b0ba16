"""SPEC §5: raw bytes → NewEmail, with MimeKit's answers as the expected values."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relate_smtp.handlers import _mime
from relate_smtp.handlers.limits import MimeLimits
from relate_smtp.handlers.message import (
    PARSE_OFF_LOOP_ABOVE,
    AttachmentTooLarge,
    MimeLimitExceeded,
    build_email,
    looks_large,
)
from relate_smtp.storage.records import (
    CONTENT_TYPE_MAX,
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    FILE_NAME_MAX,
    IN_REPLY_TO_MAX,
    MESSAGE_ID_MAX,
    REFERENCES_MAX,
    SUBJECT_MAX,
    NewEmail,
)

LIMIT = 1 << 20


def build(
    raw: bytes | str,
    *,
    envelope_recipients: Sequence[str] = ("bob@example.org",),
    sent_by_user_id: uuid.UUID | None = None,
    max_attachment_size: int = LIMIT,
    limits: MimeLimits = MimeLimits(),
    received_at: datetime | None = None,
) -> NewEmail:
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return build_email(
        data,
        envelope_recipients=envelope_recipients,
        sent_by_user_id=sent_by_user_id,
        max_attachment_size=max_attachment_size,
        limits=limits,
        received_at=received_at,
    )


def message(headers: str = "", body: str = "Hello\r\n") -> str:
    """A message with the given header lines (LF-separated here, sent with CRLF)."""
    lines = [line.rstrip("\r") for line in headers.strip("\n").split("\n") if line]
    return "".join(line + "\r\n" for line in lines) + "\r\n" + body


def multipart(subtype: str, *parts: str, boundary: str = "b1", extra: str = "") -> str:
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--\r\n"
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"{extra}\r\n\r\n' + body


def part(content_type: str, body: str, *headers: str) -> str:
    head = "".join(h + "\r\n" for h in (f"Content-Type: {content_type}", *headers))
    return head + "\r\n" + body


def with_body(mime: str, headers: str = "From: a@example.com") -> str:
    return "".join(h + "\r\n" for h in headers.split("\n") if h) + mime


# --- record basics -----------------------------------------------------------------------


def test_record_fields_from_arguments() -> None:
    raw = message("From: a@example.com")
    user = uuid.uuid4()
    when = datetime(2024, 6, 4, 10, 0, tzinfo=UTC)
    email = build(
        raw,
        envelope_recipients=["x@example.org", "Y@Example.org"],
        sent_by_user_id=user,
        received_at=when,
    )
    assert email.size_bytes == len(raw.encode()) - 2
    assert email.sent_by_user_id == user
    assert email.received_at == when
    assert email.envelope_recipients == ("x@example.org", "Y@Example.org")
    assert isinstance(email.id, uuid.UUID)
    assert email.id != build(raw).id


def test_received_at_defaults_to_now_utc() -> None:
    before = datetime.now(UTC)
    email = build(message("From: a@example.com"))
    assert email.received_at.tzinfo is not None
    assert before <= email.received_at <= datetime.now(UTC) + timedelta(seconds=1)


def test_parse_threshold() -> None:
    assert PARSE_OFF_LOOP_ABOVE == 64 * 1024
    assert not looks_large(2048)
    assert looks_large(PARSE_OFF_LOOP_ABOVE + 1)


# --- Message-ID, In-Reply-To, References -------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Message-ID: <abc@example.com>", "abc@example.com"),
        ("Message-ID:   <abc@example.com>  ", "abc@example.com"),
        ("Message-ID: abc@example.com", "abc@example.com"),
        ("Message-Id: <abc@example.com> (comment)", "abc@example.com"),
        ("Message-ID:\r\n <abc@example.com>", "abc@example.com"),
    ],
)
def test_message_id_without_brackets(header: str, expected: str) -> None:
    assert build(message(header)).message_id == expected


@pytest.mark.parametrize("header", ["", "Message-ID:", "Message-ID: <>"])
def test_message_id_defaults_to_new_uuid(header: str) -> None:
    first = build(message(header)).message_id
    assert str(uuid.UUID(first)) == first
    assert build(message(header)).message_id != first


def test_in_reply_to_first_id_without_brackets() -> None:
    email = build(message("In-Reply-To: <parent@x.example> <other@x.example>"))
    assert email.in_reply_to == "parent@x.example"


def test_in_reply_to_skips_phrases_and_comments() -> None:
    email = build(message('In-Reply-To: "Your message <no@x>" (of Tuesday) <parent@x.example>'))
    assert email.in_reply_to == "parent@x.example"


def test_in_reply_to_absent_or_unbracketed() -> None:
    assert build(message("From: a@example.com")).in_reply_to is None
    # MimeKit's EnumerateReferences only yields bracketed ids.
    assert build(message("In-Reply-To: parent@x.example")).in_reply_to is None


def test_references_in_mimekit_form() -> None:
    email = build(message("References: <a@x>\r\n\t<b@x>,<c@x>   (note) <d@x>"))
    assert email.references == "<a@x> <b@x> <c@x> <d@x>"


def test_references_absent_is_empty_string() -> None:
    """SPEC §5: MimeKit's References list is never null and prints as ""."""
    assert build(message("From: a@example.com")).references == ""
    assert build(message("References: nothing here")).references == ""


# --- From ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "address", "name"),
    [
        ("From: alice@example.com", "alice@example.com", ""),
        ("From: Alice Example <alice@example.com>", "alice@example.com", "Alice Example"),
        ('From: "Example, Alice" <alice@example.com>', "alice@example.com", "Example, Alice"),
        ("From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <j@example.de>", "j@example.de", "Jörg Müller"),
        ('From: "=?iso-8859-1?q?J=F6rg?=" <j@example.de>', "j@example.de", "Jörg"),
        ("From: =?utf-8?b?0JDQvdC90LA=?= <anna@example.ru>", "anna@example.ru", "Анна"),
        (
            "From: Alice <Alice.Smith@Example.COM>, bob@example.com",
            "Alice.Smith@Example.COM",
            "Alice",
        ),
    ],
)
def test_from_first_mailbox(header: str, address: str, name: str) -> None:
    email = build(message(header))
    assert (email.from_address, email.from_display_name) == (address, name)


def test_from_raw_utf8_display_name() -> None:
    email = build(message("From: Jörg <j@example.de>"))
    assert email.from_display_name == "Jörg"


@pytest.mark.parametrize("header", ["", "From:", "From: undisclosed:;", "From: <>"])
def test_missing_from_is_empty(header: str) -> None:
    email = build(message(header))
    assert (email.from_address, email.from_display_name) == ("", "")


# --- Subject ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Subject: Hello world", "Hello world"),
        ("Subject: Hello\r\n world", "Hello world"),
        ("Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),
        ("Subject: =?UTF-8?B?w5xiZXI=?= =?UTF-8?B?IGFsbGVz?=", "Über alles"),
        ("Subject: Re: =?iso-8859-1?q?caf=E9?= today", "Re: café today"),
        # A character split across two encoded words survives.
        ("Subject: =?utf-8?b?4oI=?= =?utf-8?b?rA==?=", "€"),
        ("Subject: =?x-unknown?q?caf=C3=A9?=", "café"),
        ("Subject: =?utf-8?q?broken", "=?utf-8?q?broken"),
        ("Subject: Grüße raw", "Grüße raw"),
        ("Subject: =?utf-8?q?one?=\r\n =?utf-8?q?_two?=", "one two"),
        ("Subject: =?utf-8?q?line=0D=0Abreak?=", "linebreak"),
    ],
)
def test_subject_decoded_and_unfolded(header: str, expected: str) -> None:
    assert build(message(header)).subject == expected


def test_subject_default_only_when_the_header_is_missing() -> None:
    assert build(message("From: a@example.com")).subject == "(No Subject)"


@pytest.mark.parametrize("header", ["Subject:", "Subject:    ", "Subject: =?utf-8?q??="])
def test_empty_subject_is_stored_empty(header: str) -> None:
    """MimeKit's ``Subject ?? "(No Subject)"``: an empty header is not a missing one."""
    assert build(message(header)).subject == ""


# --- bodies -------------------------------------------------------------------------------


def test_plain_only() -> None:
    email = build(message("Content-Type: text/plain", "Hi there\r\n"))
    assert email.text_body == "Hi there\r\n"
    assert email.html_body is None


def test_no_content_type_is_plain_text() -> None:
    assert build(message("From: a@example.com", "Hi\r\n")).text_body == "Hi\r\n"


def test_html_only() -> None:
    email = build(message("Content-Type: text/html; charset=utf-8", "<p>Hi</p>"))
    assert email.html_body == "<p>Hi</p>"
    assert email.text_body is None


def test_alternative_last_matching_part_wins() -> None:
    mime = multipart(
        "alternative",
        part("text/plain", "first plain"),
        part("text/html", "<p>html</p>"),
        part("text/plain", "second plain"),
    )
    email = build(with_body(mime))
    assert email.text_body == "second plain"
    assert email.html_body == "<p>html</p>"


def test_mixed_with_alternative_and_attachment() -> None:
    alternative = multipart(
        "alternative",
        part("text/plain; charset=utf-8", "plain"),
        multipart(
            "related", part("text/html", "<img src=cid:x>"), part("image/png", "x"), boundary="b3"
        ),
        boundary="b2",
    )
    attachment = part(
        "application/pdf",
        base64.b64encode(b"%PDF-1.4").decode(),
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="doc.pdf"',
    )
    email = build(with_body(multipart("mixed", alternative, attachment)))
    assert email.text_body == "plain"
    assert email.html_body == "<img src=cid:x>"
    assert [(a.file_name, a.content_type, a.content) for a in email.attachments] == [
        ("doc.pdf", "application/pdf", b"%PDF-1.4")
    ]


def test_mixed_first_text_part_decides() -> None:
    # MimeKit: the first text part of a multipart/mixed is the body; an HTML body after
    # a plain one is not looked for.
    mime = multipart("mixed", part("text/plain", "plain"), part("text/html", "<p>later</p>"))
    email = build(with_body(mime))
    assert email.text_body == "plain"
    assert email.html_body is None


def test_mixed_skips_attached_text() -> None:
    mime = multipart(
        "mixed",
        part("text/plain", "notes", "Content-Disposition: attachment; filename=notes.txt"),
        part("text/plain", "body"),
    )
    email = build(with_body(mime))
    assert email.text_body == "body"
    assert [a.file_name for a in email.attachments] == ["notes.txt"]


def test_related_root_by_start_parameter() -> None:
    mime = multipart(
        "related",
        part("image/png", "png"),
        part("text/html", "<p>root</p>", "Content-ID: <root@x>"),
        extra='; start="<root@x>"',
    )
    assert build(with_body(mime)).html_body == "<p>root</p>"


def test_quoted_printable_body() -> None:
    raw = message(
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable",
        "Gr=C3=BC=C3=9Fe, soft=\r\nbreak\r\n",
    )
    assert build(raw).text_body == "Grüße, softbreak\r\n"


def test_base64_body() -> None:
    encoded = base64.encodebytes("Ünïcödé body".encode()).decode().replace("\n", "\r\n")
    raw = message(
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64", encoded
    )
    assert build(raw).text_body == "Ünïcödé body"


@pytest.mark.parametrize(
    ("charset", "payload", "expected"),
    [
        ("iso-8859-1", "café".encode("latin-1"), "café"),
        ("windows-1252", "€uro".encode("cp1252"), "€uro"),
        ("koi8-r", "привет".encode("koi8-r"), "привет"),
        ("x-made-up", "café".encode(), "café"),  # unknown → UTF-8
        ("x-made-up", "café".encode("latin-1"), "café"),  # …else ISO-8859-1
        ("utf-8", b"bad \xff byte", "bad \ufffd byte"),
        ("us-ascii", "naïve".encode(), "naïve"),
        ("base64", b"not a text codec", "not a text codec"),
    ],
)
def test_body_charsets(charset: str, payload: bytes, expected: str) -> None:
    raw = f"Content-Type: text/plain; charset={charset}\r\n\r\n".encode() + payload
    assert build(raw).text_body == expected


def test_format_flowed_unwrapped() -> None:
    body = "This is a \r\nflowed line.\r\n> quoted \r\n> text\r\n\r\n -- stuffed\r\n"
    raw = message("Content-Type: text/plain; format=flowed", body)
    assert build(raw).text_body == "This is a flowed line.\n> quoted text\n\n-- stuffed\n"


def test_format_flowed_delsp() -> None:
    raw = message('Content-Type: text/plain; format="flowed"; delsp=yes', "Lang \r\nwort\r\n")
    assert build(raw).text_body == "Langwort\n"


# --- recipients ---------------------------------------------------------------------------


def test_header_recipients() -> None:
    headers = (
        "To: Bob Example <Bob@Example.org>, carol@example.org\n"
        'Cc: Team: dave@example.net, "Eve, E." <eve@example.net>;, =?utf-8?q?Fr=C3=A9d?= '
        "<fred@example.net>\n"
        "Bcc: hidden@example.com\n"
        "To: second-to@example.org"
    )
    rows = [(r.type, r.address, r.display_name) for r in build(message(headers)).header_recipients]
    assert rows == [
        ("To", "Bob@Example.org", "Bob Example"),
        ("To", "carol@example.org", ""),
        ("To", "second-to@example.org", ""),
        ("Cc", "dave@example.net", ""),
        ("Cc", "eve@example.net", "Eve, E."),
        ("Cc", "fred@example.net", "Fréd"),
        ("Bcc", "hidden@example.com", ""),
    ]


@pytest.mark.parametrize(
    ("raw", "size"),
    [(b"Subject: s\r\n\r\nbody\r\n", 18), (b"Subject: s\r\n\r\nbody", 18), (b"", 0)],
)
def test_size_excludes_the_final_crlf_as_the_original(raw: bytes, size: int) -> None:
    """The original stored the DATA block up to ``CRLF.CRLF``, without that CRLF."""
    assert build(raw).size_bytes == size


def test_empty_and_invalid_recipients_skipped() -> None:
    headers = "To: undisclosed-recipients:;\nCc: <>, , ok@example.org, @nolocal, nodomain@\nBcc:"
    rows = [(r.type, r.address) for r in build(message(headers)).header_recipients]
    assert rows == [("Cc", "ok@example.org")]


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z][A-Za-z .'-]{0,12}", fullmatch=True) | st.just(""),
            st.from_regex(r"[a-z0-9._+-]{1,10}@[a-z0-9-]{1,10}\.[a-z]{2,4}", fullmatch=True),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fast_address_split_matches_getaddresses(pairs: list[tuple[str, str]]) -> None:
    from email.utils import getaddresses

    assert _mime._simple_addresses(["Bob  Ex <b@x.example>, c@d.example"]) == [
        ("Bob Ex", "b@x.example"),
        ("", "c@d.example"),
    ]
    text = ", ".join(f"{name} <{addr}>" if name else addr for name, addr in pairs)
    assert _mime._simple_addresses([text]) in (None, getaddresses([text]))


# --- attachments --------------------------------------------------------------------------


def attachment_message(*headers: str, body: str = "aGVsbG8=") -> str:
    return with_body(
        multipart(
            "mixed",
            part("text/plain", "body"),
            "".join(h + "\r\n" for h in (*headers, "Content-Transfer-Encoding: base64"))
            + "\r\n"
            + body,
        )
    )


@pytest.mark.parametrize(
    ("headers", "name"),
    [
        (
            ("Content-Type: text/plain", 'Content-Disposition: attachment; filename="a b.txt"'),
            "a b.txt",
        ),
        (
            (
                "Content-Type: application/pdf",
                "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf",
            ),
            "résumé.pdf",
        ),
        (
            (
                "Content-Type: application/pdf",
                "Content-Disposition: attachment;\r\n"
                " filename*0*=utf-8''long%20;\r\n filename*1=name.pdf",
            ),
            "long name.pdf",
        ),
        (
            (
                "Content-Type: application/pdf",
                'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="',
            ),
            "résumé.pdf",
        ),
        (
            (
                'Content-Type: application/pdf; name="from-type.pdf"',
                "Content-Disposition: attachment",
            ),
            "from-type.pdf",
        ),
        (
            (
                'Content-Type: application/pdf; name="from-type.pdf"',
                'Content-Disposition: attachment; filename="  "',
            ),
            "from-type.pdf",
        ),
        (
            ("Content-Type: application/pdf", 'Content-Disposition: attachment; filename="ü.pdf"'),
            "ü.pdf",
        ),
    ],
)
def test_attachment_file_names(headers: tuple[str, ...], name: str) -> None:
    [attachment] = build(attachment_message(*headers)).attachments
    assert attachment.file_name == name
    assert attachment.content == b"hello"


GENERATED = {
    "image/jpeg": "attachment.jpg",
    "image/png": "attachment.png",
    "image/gif": "attachment.gif",
    "image/webp": "attachment.webp",
    "image/svg+xml": "attachment.svg",
    "application/pdf": "attachment.pdf",
    "application/zip": "attachment.zip",
    "application/x-zip-compressed": "attachment.zip",
    "application/msword": "attachment.doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "attachment.docx",
    "application/vnd.ms-excel": "attachment.xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "attachment.xlsx",
    "application/vnd.ms-powerpoint": "attachment.ppt",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "attachment.pptx",
    "text/plain": "attachment.txt",
    "text/html": "attachment.html",
    "text/csv": "attachment.csv",
    "application/json": "attachment.json",
    "application/xml": "attachment.xml",
    "text/xml": "attachment.xml",
    "application/octet-stream": "attachment",
    "Image/JPEG": "attachment.jpg",
}


@pytest.mark.parametrize(("content_type", "name"), GENERATED.items())
def test_generated_attachment_names(content_type: str, name: str) -> None:
    raw = attachment_message(f"Content-Type: {content_type}", "Content-Disposition: attachment")
    [attachment] = build(raw).attachments
    assert attachment.file_name == name
    assert attachment.content_type == content_type.lower()


def test_inline_and_undisposed_parts_are_not_attachments() -> None:
    mime = multipart(
        "mixed",
        part("text/plain", "body"),
        part("image/png", "x", 'Content-Disposition: inline; filename="logo.png"'),
        part("application/pdf; name=x.pdf", "x"),
        part("image/gif", "x", "Content-Disposition: ATTACHMENT"),
    )
    assert [a.file_name for a in build(with_body(mime)).attachments] == ["attachment.gif"]


def test_quoted_printable_attachment_decoded() -> None:
    mime = multipart(
        "mixed",
        part(
            "text/csv",
            "a=3Db\r\n",
            "Content-Transfer-Encoding: quoted-printable",
            "Content-Disposition: attachment",
        ),
    )
    assert build(with_body(mime)).attachments[0].content == b"a=b\r\n"


def test_attached_message_kept_whole() -> None:
    inner = "Subject: inner\r\n\r\ninner body\r\n"
    mime = multipart(
        "mixed",
        part("text/plain", "outer"),
        part("message/rfc822", inner, 'Content-Disposition: attachment; filename="fwd.eml"'),
    )
    email = build(with_body(mime))
    assert email.text_body == "outer"
    [attachment] = email.attachments
    assert (attachment.file_name, attachment.content_type) == ("fwd.eml", "message/rfc822")
    assert b"Subject: inner" in attachment.content
    assert b"inner body" in attachment.content


def test_attachment_too_large() -> None:
    raw = attachment_message("Content-Type: application/pdf", "Content-Disposition: attachment")
    assert build(raw, max_attachment_size=5).attachments[0].size_bytes == 5
    with pytest.raises(AttachmentTooLarge) as info:
        build(raw, max_attachment_size=4)
    assert (info.value.size, info.value.limit) == (5, 4)


def test_limit_applies_to_decoded_size() -> None:
    payload = base64.encodebytes(b"x" * 300).decode().replace("\n", "\r\n")
    raw = attachment_message(
        "Content-Type: application/zip", "Content-Disposition: attachment", body=payload
    )
    assert len(payload) > 300
    assert build(raw, max_attachment_size=300).attachments[0].size_bytes == 300


# --- truncation and cleaning ----------------------------------------------------------


def test_long_fields_truncated_to_columns() -> None:
    long_local = "l" * 400
    headers = (
        f"Message-ID: <{'m' * 600}@x>\n"
        f"In-Reply-To: <{'r' * 600}@x>\n"
        f"References: {' '.join(f'<ref{i:04}@example.com>' for i in range(200))}\n"
        f"From: {'N' * 600} <{long_local}@example.com>\n"
        f"To: {'T' * 600} <{long_local}@example.org>\n"
        f"Subject: {'s' * 1200}"
    )
    email = build(message(headers))
    assert len(email.message_id) == MESSAGE_ID_MAX
    assert email.in_reply_to is not None and len(email.in_reply_to) == IN_REPLY_TO_MAX
    assert email.references is not None and len(email.references) <= REFERENCES_MAX
    # Whole ids are dropped: the first (thread root) and the latest (parent) are kept.
    assert email.references.startswith("<ref0000@example.com> <ref")
    assert email.references.endswith("<ref0199@example.com>")
    assert len(email.from_address) == EMAIL_ADDRESS_MAX
    assert len(email.from_display_name) == DISPLAY_NAME_MAX
    [to] = email.header_recipients
    assert len(to.address) == EMAIL_ADDRESS_MAX
    assert to.display_name is not None and len(to.display_name) == DISPLAY_NAME_MAX
    assert len(email.subject) == SUBJECT_MAX


def test_long_attachment_name_and_type_truncated() -> None:
    raw = attachment_message(
        f"Content-Type: application/{'x' * 300}",
        f'Content-Disposition: attachment; filename="{"f" * 700}.pdf"',
    )
    [attachment] = build(raw).attachments
    assert len(attachment.file_name) == FILE_NAME_MAX
    assert attachment.file_name.endswith("f.pdf")
    assert len(attachment.content_type) == CONTENT_TYPE_MAX


def test_nul_and_surrogates_cleaned_everywhere() -> None:
    raw = (
        b"From: =?utf-8?q?A=00lice?= <a\x00@example.com>\r\n"
        b"To: =?utf-8?q?B=00ob?= <bob@example.org>\r\n"
        b"Subject: sub=?utf-8?q?=00?=ject \xed\xa0\x80\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbo\x00dy \xed\xa0\x80\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="f\x00\xed\xa0\x80.pdf"\r\n\r\nx\r\n'
        b"--b--\r\n"
    )
    email = build(raw)
    strings = [
        email.from_address,
        email.from_display_name,
        email.subject,
        email.text_body or "",
        *(r.display_name or "" for r in email.header_recipients),
        *(a.file_name for a in email.attachments),
    ]
    for value in strings:
        assert "\x00" not in value
        assert not any("\ud800" <= c <= "\udfff" for c in value)
        value.encode("utf-8")
    assert email.from_display_name == "Alice"
    assert email.subject.startswith("subject ")
    assert email.text_body is not None and email.text_body.startswith("body ")
    assert email.attachments[0].file_name.startswith("f")


def test_clean_replaces_lone_surrogates() -> None:
    assert _mime.clean("a\udcff\x00b") == "a\ufffdb"


# --- malformed input ----------------------------------------------------------------------


def test_garbage_bytes() -> None:
    email = build(b"\x00\xff\xfe garbage \x80\x81 without any headers")
    assert email.subject == "(No Subject)"
    assert email.from_address == ""


def test_header_without_colon() -> None:
    raw = "From: a@example.com\r\nThis line has no colon\r\nSubject: lost\r\n\r\nbody\r\n"
    email = build(raw)
    assert email.from_address == "a@example.com"
    assert email.text_body is not None and "This line has no colon" in email.text_body


def test_broken_boundary_stored_as_raw_text() -> None:
    raw = (
        'From: a@example.com\r\nContent-Type: multipart/mixed; boundary="nope"\r\n\r\n'
        "--other\r\nContent-Type: text/plain\r\n\r\ntext\r\n--other--\r\n"
    )
    email = build(raw)
    assert email.text_body is not None and "text" in email.text_body
    assert email.attachments == ()


def test_multipart_without_boundary_parameter() -> None:
    email = build("Content-Type: multipart/alternative\r\n\r\nsome text\r\n")
    assert email.text_body == "some text\r\n"


def test_missing_close_boundary() -> None:
    raw = with_body('Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nbody text\r\n')
    assert build(raw).text_body is not None


def test_bad_base64_attachment() -> None:
    raw = attachment_message(
        "Content-Type: application/pdf", "Content-Disposition: attachment", body="@@@not*base64!"
    )
    assert len(build(raw).attachments) == 1


def nested(depth: int) -> str:
    """A message of ``depth`` multiparts, each the only part of the one before."""
    return (
        "".join(
            f"--b{i - 1}\r\n" * (i > 0) + f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n'
            for i in range(depth)
        )
        + "--"
        + f"b{depth - 1}\r\n\r\ndeep\r\n"
    )


def test_nesting_at_the_limit_parses() -> None:
    assert build(nested(100)).text_body == "deep"  # the text part is 100 levels down


def test_nesting_beyond_the_limit_is_refused() -> None:
    with pytest.raises(MimeLimitExceeded, match="nesting deeper than 100"):
        build(nested(101))


def test_nesting_beyond_the_interpreter_is_stored_as_text() -> None:
    # With the limit raised past Python's recursion limit the body falls back to raw text.
    email = build(nested(1500), limits=MimeLimits(max_nesting_depth=10_000, max_parts=10_000))
    assert email.text_body is not None and "deep" in email.text_body


def test_fast_path_matches_full_parse() -> None:
    # A single-part message is parsed header-only; the result must equal a full parse.
    from email.parser import BytesParser
    from email.policy import compat32

    from relate_smtp.handlers import message as module

    raw = message(
        "From: A <a@example.com>\nSubject: s\nContent-Type: text/plain; charset=latin-1\n"
        "Content-Transfer-Encoding: quoted-printable",
        "caf=E9\r\nline two\r\n\r\n\r\n",
    ).encode()
    fast = module._parse(raw, MimeLimits())
    full = BytesParser(policy=compat32).parsebytes(raw)
    assert fast.items() == full.items()
    assert fast.get_payload(decode=True) == full.get_payload(decode=True)


# --- never raises -------------------------------------------------------------------------

_FRAGMENTS = [
    b"From: ",
    b"To: ",
    b"Subject: ",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: text/plain; charset=",
    b"Content-Disposition: attachment; filename*=",
    b"Content-Transfer-Encoding: base64\r\n",
    b"--b\r\n",
    b"--b--\r\n",
    b"=?",
    b"?q?",
    b"?b?",
    b"?=",
    b"<",
    b">",
    b"\r\n",
    b"\r\n\r\n",
    b"\x00",
    b"\xff",
    b";",
    b'"',
    b"(",
    b"Content-Type: message/rfc822\r\n",
    b"format=flowed",
    b"''",
    b"%",
    b" ",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    email = build(raw, max_attachment_size=1 << 30)
    assert email.size_bytes == len(raw) - (2 if raw.endswith(b"\r\n") else 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=8), max_size=60))
def test_never_raises_on_mime_like_bytes(chunks: list[bytes]) -> None:
    email = build(b"".join(chunks), max_attachment_size=1 << 30)
    for value in (email.subject, email.from_address, email.text_body or "", email.message_id):
        value.encode("utf-8")
        assert "\x00" not in value


def test_a_body_too_deeply_nested_to_parse_is_stored_as_raw_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nesting the parser cannot follow must not become a temporary failure retried forever.

    (With the default limits such a message is refused first: 554 5.6.0.)
    """
    inner = b""
    depth = 800
    for i in range(depth):
        inner += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
    inner += b"--b%d\r\nContent-Type: text/plain\r\n\r\nhello\r\n" % depth
    raw = (
        b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: deep\r\n"
        b"Content-Type: multipart/mixed; boundary=OUT\r\n\r\n--OUT\r\n"
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
        b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + inner + b"\r\n--OUT--\r\n"
    )
    email = build_email(
        raw,
        envelope_recipients=["bob@example.org"],
        sent_by_user_id=None,
        max_attachment_size=10**8,
        limits=MimeLimits(max_nesting_depth=10_000, max_parts=10_000),
    )
    assert email.subject == "deep"
    assert email.from_address == "ann@example.com"
    assert email.size_bytes == len(raw) - 2
    assert email.text_body is not None and "boundary=b799" in email.text_body
    assert email.attachments == ()
    assert "stored as raw text" in caplog.text
