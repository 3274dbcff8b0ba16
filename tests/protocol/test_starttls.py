"""STARTTLS (RFC 3207): injection discard, PAUSED, and the fresh session after it."""

from __future__ import annotations

import pytest

from relate_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    TLS_NOT_AVAILABLE,
    ConnectionClosed,
    LocalProtocolError,
    StartTLS,
    State,
)

from .helpers import connect, feed, greeted, replies, talk


def test_starttls_discards_pipelined_bytes_and_pauses() -> None:
    conn = connect(tls_available=True, auth_required=False)
    feed(conn, b"EHLO c\r\n")
    conn.data_to_send()
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<x@y.example>\r\n")
    event = conn.next_event()
    assert event == StartTLS()
    conn.accept()
    assert conn.next_event() is PAUSED
    assert conn.state is State.TLS_HANDSHAKE
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    conn.receive_data(b"NOOP\r\n")  # still plaintext: dropped as well
    assert conn.next_event() is PAUSED
    conn.tls_started()
    assert conn.tls_active
    assert conn.state.name == "CONNECTED"
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""  # the injected commands were never answered


def test_session_after_tls_forgets_ehlo_and_auth() -> None:
    conn = greeted(tls_available=True)
    assert conn.authenticated
    # AUTH after EHLO before STARTTLS is allowed on the default (insecure-auth) config
    _, lines = talk(conn, b"STARTTLS\r\n")
    assert lines == ["220 2.0.0 Ready to start TLS"]
    conn.tls_started()
    assert not conn.authenticated
    assert conn.hello_name is None
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines == ["503 5.5.1 Send EHLO or HELO first"]
    _, lines = talk(conn, b"EHLO c\r\n")
    assert "250-STARTTLS" not in lines and "250 STARTTLS" not in lines
    assert lines[-1] == "250 AUTH PLAIN LOGIN"
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines == ["530 5.7.0 Authentication required"]


def test_auth_offered_only_after_tls_when_insecure_auth_is_off() -> None:
    conn = connect(tls_available=True, allow_insecure_auth=False)
    _, lines = talk(conn, b"EHLO c\r\n")
    assert not any("AUTH" in line for line in lines)
    _, lines = talk(conn, b"STARTTLS\r\n")
    conn.tls_started()
    _, lines = talk(conn, b"EHLO c\r\n")
    assert lines[-1] == "250 AUTH PLAIN LOGIN"


def test_starttls_rejected_by_the_application() -> None:
    conn = greeted(tls_available=True)
    _, lines = talk(conn, b"STARTTLS\r\nNOOP\r\n", policy=lambda d: TLS_NOT_AVAILABLE)
    assert lines == ["454 4.7.0 TLS not available", "250 2.0.0 OK"]
    assert not conn.tls_active


def test_starttls_not_offered_or_already_active() -> None:
    conn = greeted()
    _, lines = talk(conn, b"STARTTLS\r\n")
    assert lines == ["502 5.5.1 Command not implemented"]
    conn = greeted(tls_available=True, tls_active=True)
    _, lines = talk(conn, b"STARTTLS\r\n")
    assert lines == ["503 5.5.1 TLS already active"]


def test_starttls_syntax_and_sequence() -> None:
    conn = connect(tls_available=True)
    _, lines = talk(conn, b"STARTTLS\r\n")
    assert lines == ["503 5.5.1 Send EHLO or HELO first"]
    feed(conn, b"EHLO c\r\n")
    conn.data_to_send()
    _, lines = talk(conn, b"STARTTLS now\r\n")
    assert lines == ["501 5.5.4 Syntax error, no parameters allowed"]


def test_tls_started_without_starttls_is_misuse() -> None:
    conn = greeted(tls_available=True)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()
    assert conn.state is State.ERROR


def test_implicit_tls_config() -> None:
    conn = connect(tls_available=True, tls_active=True)
    assert conn.tls_active
    _, lines = talk(conn, b"EHLO c\r\n")
    assert not any("STARTTLS" in line for line in lines)
    assert replies(conn.data_to_send()) == []


def test_eof_before_the_handshake_closes() -> None:
    conn = greeted(tls_available=True)
    talk(conn, b"STARTTLS\r\n")
    assert conn.next_event() is PAUSED
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
