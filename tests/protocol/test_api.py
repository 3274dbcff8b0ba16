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
    MessageChunk,
    MessageStart,
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


def pending(decision: str) -> ServerConnection:
    """A connection with a decision of the named kind waiting for its answer."""
    mail, rcpt = b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n"
    before, last = {
        "Hello": ([], b"EHLO again.example\r\n"),
        "AuthRequest": ([], b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"),
        "MailFrom": ([], mail),
        "RcptTo": ([mail], rcpt),
        "StartTLS": ([], b"STARTTLS\r\n"),
        "MessageEnd": ([mail, rcpt], b"DATA\r\nx\r\n.\r\n"),
    }[decision]
    conn = greeted(auth=decision != "AuthRequest", tls_available=True)
    feed(conn, *before)
    conn.receive_data(last)
    event = conn.next_event()
    while isinstance(event, MessageStart | MessageChunk):
        event = conn.next_event()
    assert type(event).__name__ == decision, event
    return conn


def _reply(code: int) -> Reply:
    return Reply(code, None, ("text",))


@pytest.mark.parametrize(
    ("decision", "verb", "code"),
    [
        ("RcptTo", "accept", 354),  # RFC 5321 §4.3.2: RCPT is answered 250/251 or an error
        ("MailFrom", "accept", 354),
        ("MessageEnd", "accept", 354),
        ("Hello", "accept", 221),
        ("AuthRequest", "accept", 250),  # RFC 4954 §6: success is 235
        ("StartTLS", "accept", 250),  # RFC 3207 §4: 220
        ("MailFrom", "accept", 451),  # an error passed to accept
        ("RcptTo", "reject", 250),  # a success passed to reject
        ("AuthRequest", "reject", 550),
        ("StartTLS", "reject", 550),
        ("MessageEnd", "reject", 530),
        ("Hello", "reject", 451),
    ],
)
def test_answer_with_a_code_the_decision_cannot_take(decision: str, verb: str, code: int) -> None:
    conn = pending(decision)
    with pytest.raises(LocalProtocolError):
        getattr(conn, verb)(_reply(code))
    assert conn.state is State.ERROR


@pytest.mark.parametrize(
    ("decision", "verb", "code"),
    [
        ("RcptTo", "accept", 251),
        ("RcptTo", "reject", 530),  # RFC 4954 §6
        ("MailFrom", "reject", 553),
        ("AuthRequest", "accept", 235),
        ("AuthRequest", "reject", 454),
        ("StartTLS", "accept", 220),
        ("StartTLS", "reject", 454),
        ("MessageEnd", "reject", 554),
        ("Hello", "reject", 550),
    ],
)
def test_answer_with_a_code_the_decision_can_take(decision: str, verb: str, code: int) -> None:
    conn = pending(decision)
    getattr(conn, verb)(_reply(code))
    assert conn.state is not State.ERROR


@pytest.mark.parametrize("decision", ["Hello", "AuthRequest", "MailFrom", "RcptTo", "MessageEnd"])
def test_reject_with_421_closes_the_session(decision: str) -> None:
    """RFC 5321 §3.8: a 421 reply means the server closes the channel."""
    conn = pending(decision)
    conn.receive_data(b"NOOP\r\n")  # pipelined behind: never answered
    conn.reject(SHUTTING_DOWN)
    assert conn.closed
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send().endswith(b"421 4.3.2 Service shutting down, closing channel\r\n")
