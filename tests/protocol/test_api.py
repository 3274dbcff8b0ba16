"""The sans-IO API contract: misuse raises LocalProtocolError, abort, properties."""

from __future__ import annotations

import pytest

from relate_smtp.protocol import (
    AUTH_FAILED,
    NEED_DATA,
    SHUTTING_DOWN,
    TIMEOUT,
    ConnectionClosed,
    LocalProtocolError,
    MailFrom,
    Pending,
    ProtocolError,
    Reply,
    ServerConnection,
    State,
)

from .helpers import connect, feed, greeted, in_transaction, replies, talk


def pending_mail() -> ServerConnection:
    conn = greeted()
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(conn.next_event(), MailFrom)
    return conn


def test_pending_members() -> None:
    assert NEED_DATA is Pending.NEED_DATA
    assert issubclass(LocalProtocolError, ProtocolError)


def test_next_event_with_a_decision_pending() -> None:
    conn = pending_mail()
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR


@pytest.mark.parametrize("call", ["accept", "reject"])
def test_answer_without_a_decision(call: str) -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        if call == "accept":
            conn.accept()
        else:
            conn.reject(AUTH_FAILED)
    assert conn.state is State.ERROR


def test_accept_with_an_error_reply() -> None:
    conn = pending_mail()
    with pytest.raises(LocalProtocolError):
        conn.accept(AUTH_FAILED)
    assert conn.state is State.ERROR


def test_reject_with_a_success_reply() -> None:
    conn = pending_mail()
    with pytest.raises(LocalProtocolError):
        conn.reject(Reply(250, "2.0.0", ("OK",)))


def test_reject_with_something_else() -> None:
    conn = pending_mail()
    with pytest.raises(LocalProtocolError):
        conn.reject("550 no")  # type: ignore[arg-type]


def test_error_state_refuses_further_calls_but_can_still_flush_and_abort() -> None:
    conn = pending_mail()
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    for call in (
        lambda: conn.next_event(),
        lambda: conn.receive_data(b"NOOP\r\n"),
        lambda: conn.accept(),
        lambda: conn.tls_started(),
    ):
        with pytest.raises(LocalProtocolError):
            call()
    conn.abort(SHUTTING_DOWN)
    assert conn.data_to_send() == b"421 4.3.2 Service shutting down, closing channel\r\n"
    assert conn.state is State.ERROR


def test_receive_after_eof() -> None:
    conn = connect()
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeating EOF is fine
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"NOOP\r\n")


def test_abort_while_waiting_for_a_command() -> None:
    conn = greeted()
    conn.abort(SHUTTING_DOWN)
    assert conn.closed
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send() == b"421 4.3.2 Service shutting down, closing channel\r\n"
    conn.receive_data(b"NOOP\r\n")  # ignored after close
    assert isinstance(conn.next_event(), ConnectionClosed)
    conn.abort(TIMEOUT)  # a second abort says nothing more
    assert conn.data_to_send() == b""


def test_abort_drops_a_pending_decision() -> None:
    conn = pending_mail()
    conn.abort(TIMEOUT)
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert replies(conn.data_to_send()) == ["421 4.4.2 Timeout exceeded, closing channel"]
    with pytest.raises(LocalProtocolError):
        conn.accept()


def test_abort_in_the_middle_of_a_message() -> None:
    conn = in_transaction()
    feed(conn, b"DATA\r\n", b"partial")
    assert conn.in_message
    conn.abort(TIMEOUT)
    assert not conn.in_message
    assert isinstance(conn.next_event(), ConnectionClosed)


def test_properties() -> None:
    conn = connect(tls_active=True)
    assert conn.tls_active
    assert not conn.authenticated
    assert conn.hello_name is None
    assert not conn.in_message
    assert not conn.closed
    assert conn.state is State.CONNECTED
    talk(conn, b"EHLO c.example\r\n")
    assert conn.hello_name == "c.example"


def test_data_to_send_batches_everything_queued() -> None:
    conn = connect()
    feed(conn, b"NOOP\r\n", b"NOOP\r\n")
    assert conn.data_to_send() == b"220 localhost ESMTP\r\n"[:0] + b"250 2.0.0 OK\r\n" * 2
    assert conn.data_to_send() == b""


def test_unexpected_exception_puts_the_connection_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = connect()

    def boom(*args: object) -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(conn, "_advance", boom)
    conn.receive_data(b"NOOP\r\n")
    with pytest.raises(RuntimeError):
        conn.next_event()
    assert conn.state is State.ERROR
