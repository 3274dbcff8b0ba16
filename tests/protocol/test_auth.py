"""AUTH PLAIN and LOGIN exchanges (RFC 4954, RFC 4616) and who may use them."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from relate_smtp.protocol import (
    AUTH_FAILED,
    AUTH_TEMPORARY_FAILURE,
    AuthRequest,
    State,
)

from .helpers import check_transcript, connect, feed, greeted, replies, talk


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def ready(**config: Any):  # type: ignore[no-untyped-def]
    return greeted(auth=False, **config)


def test_plain_with_initial_response() -> None:
    conn = ready()
    events, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0alice\0s3cret") + b"\r\n")
    assert events == [
        AuthRequest(mechanism="PLAIN", authorization_id="", username="alice", password="s3cret")
    ]
    assert lines == ["235 2.7.0 Authentication successful"]
    assert conn.authenticated
    assert conn.state is State.READY


def test_plain_without_initial_response() -> None:
    conn = ready()
    events = check_transcript(
        conn,
        [
            (b"AUTH PLAIN\r\n", ["334 "]),
            (b64(b"\0alice\0s3cret") + b"\r\n", ["235 2.7.0"]),
        ],
    )
    assert [e.username for e in events if isinstance(e, AuthRequest)] == ["alice"]


def test_plain_empty_challenge_is_code_and_space() -> None:
    conn = ready()
    feed(conn, b"AUTH PLAIN\r\n")
    assert conn.data_to_send() == b"334 \r\n"
    assert conn.state is State.AUTH


def test_plain_with_authorization_identity() -> None:
    conn = ready()
    events, _ = talk(conn, b"AUTH PLAIN " + b64(b"admin\0alice\0pw") + b"\r\n")
    assert events == [
        AuthRequest(mechanism="PLAIN", authorization_id="admin", username="alice", password="pw")
    ]


def test_plain_utf8_credentials() -> None:
    conn = ready()
    events, _ = talk(conn, b"AUTH PLAIN " + b64("\0jos\u00e9\0p\u00e4ss".encode()) + b"\r\n")
    assert events[0] == AuthRequest(
        mechanism="PLAIN", authorization_id="", username="jos\u00e9", password="p\u00e4ss"
    )


def test_login_without_initial_response() -> None:
    conn = ready()
    events = check_transcript(
        conn,
        [
            (b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"]),
            (b64(b"alice") + b"\r\n", ["334 UGFzc3dvcmQ6"]),
            (b64(b"s3cret") + b"\r\n", ["235 2.7.0"]),
        ],
    )
    assert events == [
        AuthRequest(mechanism="LOGIN", authorization_id="", username="alice", password="s3cret")
    ]


def test_login_with_initial_response() -> None:
    conn = ready()
    check_transcript(
        conn,
        [
            (b"auth login " + b64(b"alice") + b"\r\n", ["334 UGFzc3dvcmQ6"]),
            (b64(b"s3cret") + b"\r\n", ["235 2.7.0"]),
        ],
    )
    assert conn.authenticated


def test_password_is_not_in_the_repr() -> None:
    event = AuthRequest(mechanism="PLAIN", authorization_id="", username="u", password="hunter2")
    assert "hunter2" not in repr(event)


@pytest.mark.parametrize(
    "exchange",
    [
        [b"AUTH PLAIN\r\n", b"*\r\n"],
        [b"AUTH LOGIN\r\n", b"*\r\n"],
        [b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n", b"*\r\n"],
    ],
)
def test_star_cancels(exchange: list[bytes]) -> None:
    conn = ready()
    _, lines = talk(conn, *exchange)
    assert lines[-1] == "501 5.0.0 Authentication cancelled"
    assert conn.state is State.READY
    assert not conn.authenticated
    _, lines = talk(conn, b"NOOP\r\n")  # back to commands
    assert lines == ["250 2.0.0 OK"]


@pytest.mark.parametrize(
    "exchange",
    [
        [b"AUTH PLAIN !!!!\r\n"],
        [b"AUTH PLAIN\r\n", b"not base64\r\n"],
        [b"AUTH PLAIN\r\n", b"YQ\r\n"],  # bad padding
        [b"AUTH LOGIN\r\n", b"@@@\r\n"],
        [b"AUTH LOGIN " + "\u00e9".encode() + b"\r\n"],
    ],
)
def test_bad_base64_is_501(exchange: list[bytes]) -> None:
    conn = ready()
    _, lines = talk(conn, *exchange)
    assert lines[-1].startswith("501 5.5.2")
    assert conn.state is State.READY
    assert not conn.authenticated


@pytest.mark.parametrize(
    "payload",
    [b"alice\0pw", b"\0\0pw", b"\0alice\0", b"a\0b\0c\0d", b"\0\xff\xfe\0pw"],
)
def test_malformed_plain_is_501(payload: bytes) -> None:
    conn = ready()
    _, lines = talk(conn, b"AUTH PLAIN " + b64(payload) + b"\r\n")
    assert lines == ["501 5.5.2 Malformed authentication response"]


def test_empty_initial_response_is_equals_sign() -> None:
    conn = ready()
    _, lines = talk(conn, b"AUTH PLAIN =\r\n")
    assert lines == ["501 5.5.2 Malformed authentication response"]
    _, lines = talk(conn, b"AUTH LOGIN =\r\n")
    assert lines == ["501 5.5.2 Malformed authentication response"]


def test_rejected_credentials() -> None:
    conn = ready()
    _, lines = talk(
        conn, b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n", policy=lambda d: AUTH_FAILED
    )
    assert lines == ["535 5.7.8 Authentication credentials invalid"]
    assert not conn.authenticated
    assert conn.state is State.READY
    _, lines = talk(
        conn,
        b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n",
        policy=lambda d: AUTH_TEMPORARY_FAILURE,
    )
    assert lines == ["454 4.7.0 Temporary authentication failure, try again later"]
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n")
    assert lines == ["235 2.7.0 Authentication successful"]


def test_unknown_mechanism() -> None:
    conn = ready()
    _, lines = talk(conn, b"AUTH CRAM-MD5\r\n", b"AUTH\r\n", b"AUTH PLAIN a b\r\n")
    assert lines == [
        "504 5.5.4 Unrecognized authentication type",
        "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
        "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    ]


def test_second_auth_after_success() -> None:
    conn = greeted()
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert lines == ["503 5.5.1 Already authenticated"]


def test_auth_before_ehlo_and_inside_a_transaction() -> None:
    conn = connect()
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert lines == ["503 5.5.1 Send EHLO or HELO first"]
    conn = ready(auth_required=False)
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n", b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert lines[-1] == "503 5.5.1 AUTH not permitted during a mail transaction"


def test_auth_disabled_is_not_implemented() -> None:
    conn = ready(auth_enabled=False)
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert lines == ["502 5.5.1 Command not implemented"]
    # and MAIL needs no AUTH there, whatever auth_required says
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines == ["250 2.1.0 Sender OK"]


def test_insecure_auth_refused_until_tls() -> None:
    conn = ready(allow_insecure_auth=False)
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n", b"AUTH LOGIN\r\n")
    assert lines == [
        "538 5.7.11 Encryption required for requested authentication mechanism",
        "538 5.7.11 Encryption required for requested authentication mechanism",
    ]
    conn = ready(allow_insecure_auth=False, tls_active=True)
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert lines == ["235 2.7.0 Authentication successful"]


def test_mail_requires_auth() -> None:
    conn = ready()
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines == ["530 5.7.0 Authentication required"]
    conn = ready(auth_required=False)
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines == ["250 2.1.0 Sender OK"]


def test_auth_line_may_exceed_the_command_line_limit() -> None:
    conn = ready()
    password = b"p" * 3000
    _, lines = talk(conn, b"AUTH PLAIN " + b64(b"\0alice\0" + password) + b"\r\n")
    assert lines == ["235 2.7.0 Authentication successful"]


def test_auth_response_line_limit() -> None:
    conn = ready()
    _, lines = talk(conn, b"AUTH PLAIN\r\n", b"A" * 20000 + b"\r\n", b"NOOP\r\n")
    assert lines == [
        "334 ",
        "500 5.5.6 Authentication exchange line is too long",
        "250 2.0.0 OK",
    ]
    assert conn.state is State.READY
    conn = ready()
    _, lines = talk(conn, b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")
    assert lines == ["500 5.5.2 Line too long"]


def test_auth_exchange_split_across_reads() -> None:
    conn = ready()
    data = b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\n"
    events = feed(conn, *[data[i : i + 1] for i in range(len(data))])
    assert next(e for e in events if isinstance(e, AuthRequest)).password == "pw"
    assert replies(conn.data_to_send())[-1].startswith("235")
