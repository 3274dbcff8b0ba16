"""MAIL/RCPT grammar: RFC 5321 paths, parameters, SMTPUTF8 (RFC 6531)."""

from __future__ import annotations

from typing import Any

import pytest

from relate_smtp.protocol import BodyType, Event, MailFrom, RcptTo

from .helpers import greeted, talk


def mail(line: bytes, **config: Any) -> tuple[list[Event], list[str]]:
    conn = greeted(**config)
    events, lines = talk(conn, line + b"\r\n")
    return events, lines


def rcpt(line: bytes, **config: Any) -> tuple[list[Event], list[str]]:
    conn = greeted(**config)
    talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    events, lines = talk(conn, line + b"\r\n")
    return events, lines


@pytest.mark.parametrize(
    ("line", "local", "domain", "route"),
    [
        (b"MAIL FROM:<alice@example.org>", "alice", "example.org", ()),
        (b"MAIL FROM: <alice@example.org>", "alice", "example.org", ()),
        (b"MAIL FROM:<a.b+tag@sub.example-x.org>", "a.b+tag", "sub.example-x.org", ()),
        (b"MAIL FROM:<a%b@example.org>", "a%b", "example.org", ()),
        (b"MAIL FROM:<b!a@example.org>", "b!a", "example.org", ()),
        (b'MAIL FROM:<"john doe"@example.org>', '"john doe"', "example.org", ()),
        (b'MAIL FROM:<"a@b>c"@example.org>', '"a@b>c"', "example.org", ()),
        (b'MAIL FROM:<"q\\"x"@example.org>', '"q\\"x"', "example.org", ()),
        (b"MAIL FROM:<x@[192.0.2.1]>", "x", "[192.0.2.1]", ()),
        (b"MAIL FROM:<x@[IPv6:2001:db8::1]>", "x", "[IPv6:2001:db8::1]", ()),
        (b"MAIL FROM:<x@[ipv6:::ffff:192.0.2.1]>", "x", "[ipv6:::ffff:192.0.2.1]", ()),
        (
            b"MAIL FROM:<@relay.example,@r2.example:x@example.org>",
            "x",
            "example.org",
            ("relay.example", "r2.example"),
        ),
        (b"MAIL FROM:<x@localhost>", "x", "localhost", ()),
    ],
)
def test_valid_reverse_paths(line: bytes, local: str, domain: str, route: tuple[str, ...]) -> None:
    events, lines = mail(line)
    assert lines == ["250 2.1.0 Sender OK"]
    (event,) = events
    assert isinstance(event, MailFrom)
    assert (event.local_part, event.domain, event.source_route) == (local, domain, route)
    assert event.address == f"{local}@{domain}"


def test_null_reverse_path() -> None:
    events, lines = mail(b"MAIL FROM:<>")
    assert events == [MailFrom(address="", local_part="", domain="")]
    events, lines = mail(b"MAIL FROM:<> SIZE=10")
    assert lines == ["250 2.1.0 Sender OK"]


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:alice@example.org",
        b"MAIL FROM:<alice>",
        b"MAIL FROM:<alice@>",
        b"MAIL FROM:<@example.org>",
        b"MAIL FROM:<a@b@example.org>",
        b"MAIL FROM:<alice@example.org.>",
        b"MAIL FROM:<alice@-example.org>",
        b"MAIL FROM:<alice@exa_mple.org>",
        b"MAIL FROM:<a..b@example.org>",
        b"MAIL FROM:<.a@example.org>",
        b"MAIL FROM:<a b@example.org>",
        b"MAIL FROM:<alice@example.org",
        b"MAIL FROM:<x@[300.0.0.1]>",
        b"MAIL FROM:<x@[1.2.3]>",
        b"MAIL FROM:<x@[IPv6:2001:db8::zz]>",
        b"MAIL FROM:<x@[IPv6:fe80::1%eth0]>",
        b"MAIL FROM:<x@[tag:stuff]>",
        b'MAIL FROM:<"unterminated@example.org>',
        b"MAIL FROM:<@:x@example.org>",
    ],
)
def test_invalid_reverse_paths(line: bytes) -> None:
    events, lines = mail(line)
    assert events == []
    assert lines[0].startswith("501 "), lines


def test_mail_syntax_wording() -> None:
    _, lines = mail(b"MAIL TO:<a@b.example>")
    assert lines == ["501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"]
    _, lines = mail(b"MAIL FROM:<a@b.example>junk")
    assert lines == ["501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"]
    _, lines = mail(b"MAIL FROM:<a@b>@example>")
    assert lines[0].startswith("501")
    _, lines = mail(b"MAIL FROM:<a b@example.org>")
    assert lines == ["501 5.1.7 Bad sender address syntax"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"SIZE=12345", {"size": 12345}),
        (b"BODY=7BIT", {"body": BodyType.SEVEN_BIT}),
        (b"BODY=8bitmime", {"body": BodyType.EIGHT_BIT_MIME}),
        (b"BODY=BINARYMIME", {"body": BodyType.BINARY_MIME}),
        (b"SMTPUTF8", {"smtputf8": True}),
        (b"AUTH=<>", {"auth": "<>"}),
        (b"AUTH=alice+40example.org", {"auth": "alice@example.org"}),
        (
            b"size=1 body=8BITMIME smtputf8 auth=x",
            {"size": 1, "body": BodyType.EIGHT_BIT_MIME, "smtputf8": True, "auth": "x"},
        ),
        (b"SIZE=1  BODY=7BIT", {"size": 1, "body": BodyType.SEVEN_BIT}),
    ],
)
def test_mail_parameters(params: bytes, expected: dict[str, object]) -> None:
    events, lines = mail(b"MAIL FROM:<a@b.example> " + params)
    assert lines == ["250 2.1.0 Sender OK"]
    (event,) = events
    for name, value in expected.items():
        assert getattr(event, name) == value


@pytest.mark.parametrize(
    ("params", "reply", "config"),
    [
        (b"FOO=bar", "555 5.5.4", {}),
        (b"RET=HDRS", "555 5.5.4", {}),
        (b"SIZE=abc", "501 5.5.4", {}),
        (b"SIZE=", "501 5.5.4", {}),
        (b"SIZE=\xc2\xb2", "501 5.5.4", {}),
        (b"SIZE=1 SIZE=2", "501 5.5.4", {}),
        (b"BODY=9BIT", "501 5.5.4", {}),
        (b"SMTPUTF8=yes", "501 5.5.4", {}),
        (b"AUTH=", "501 5.5.4", {}),
        (b"AUTH=bad+zz", "501 5.5.4", {}),
        (b"SMTPUTF8", "555 5.5.4", {"smtputf8": False}),
        (b"BODY=BINARYMIME", "501 5.5.4", {"binarymime": False}),
        (b"BODY=BINARYMIME", "501 5.5.4", {"chunking": False}),
        (b"BODY=8BITMIME", "555 5.5.4", {"eightbitmime": False, "chunking": False}),
        (b"AUTH=<>", "555 5.5.4", {"auth_enabled": False}),
    ],
)
def test_bad_mail_parameters(params: bytes, reply: str, config: dict[str, object]) -> None:
    auth = config.get("auth_enabled", True)
    events, lines = mail(b"MAIL FROM:<a@b.example> " + params, auth=bool(auth), **config)
    assert events == []
    assert lines[0].startswith(reply), lines


def test_utf8_addresses_need_smtputf8() -> None:
    address = "j\u00f6rg@b\u00fccher.example".encode()
    _, lines = mail(b"MAIL FROM:<" + address + b">")
    assert lines == ["553 5.6.7 Non-ASCII address requires SMTPUTF8"]
    events, lines = mail(b"MAIL FROM:<" + address + b"> SMTPUTF8")
    assert lines == ["250 2.1.0 Sender OK"]
    assert events[0].address == "j\u00f6rg@b\u00fccher.example"  # type: ignore[attr-defined]
    conn = greeted()
    talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    _, lines = talk(conn, b"RCPT TO:<" + address + b">\r\n")
    assert lines == ["553 5.6.7 Non-ASCII address requires SMTPUTF8"]
    conn = greeted()
    talk(conn, b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
    events, lines = talk(conn, b"RCPT TO:<" + address + b">\r\n")
    assert lines == ["250 2.1.5 Recipient OK"]


def test_invalid_utf8_in_arguments() -> None:
    _, lines = mail(b"MAIL FROM:<\xff@b.example> SMTPUTF8")
    assert lines == ["501 5.5.4 Arguments are not valid UTF-8"]


@pytest.mark.parametrize(
    ("line", "address", "local", "domain"),
    [
        (b"RCPT TO:<bob@example.com>", "bob@example.com", "bob", "example.com"),
        (b"RCPT TO: <bob@example.com>", "bob@example.com", "bob", "example.com"),
        (b"RCPT TO:<postmaster>", "postmaster", "postmaster", ""),
        (b"RCPT TO:<PostMaster>", "PostMaster", "PostMaster", ""),
        (
            b"RCPT TO:<postmaster@example.com>",
            "postmaster@example.com",
            "postmaster",
            "example.com",
        ),
        (b"RCPT TO:<x@[10.0.0.1]>", "x@[10.0.0.1]", "x", "[10.0.0.1]"),
    ],
)
def test_valid_forward_paths(line: bytes, address: str, local: str, domain: str) -> None:
    events, lines = rcpt(line)
    assert lines == ["250 2.1.5 Recipient OK"]
    assert events == [RcptTo(address=address, local_part=local, domain=domain)]


def test_rcpt_source_route_is_reported() -> None:
    events, _ = rcpt(b"RCPT TO:<@hosted.example:a@elsewhere.example>")
    assert events == [
        RcptTo(
            address="a@elsewhere.example",
            local_part="a",
            domain="elsewhere.example",
            source_route=("hosted.example",),
        )
    ]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", "501 5.1.3 Null recipient address not allowed"),
        (b"RCPT TO:<bob>", "501 5.1.3 Bad recipient address syntax"),
        (b"RCPT TO:<postmaster> junk=1", "555 5.5.4"),
        (b"RCPT TO:<bob@example.com> NOTIFY=NEVER", "555 5.5.4"),
        (b"RCPT TO:bob@example.com", "501 5.1.3"),
        (b"RCPT FROM:<bob@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"),
        (b"RCPT TO:<bob@example.com>x", "501 5.5.4 Syntax: RCPT TO:<address>"),
    ],
)
def test_invalid_forward_paths(line: bytes, reply: str) -> None:
    events, lines = rcpt(line)
    assert events == []
    assert lines[0].startswith(reply), lines
