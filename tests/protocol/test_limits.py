"""Limits: command line length, recipients, errors per session, buffered input."""

from __future__ import annotations

import pytest

from relate_smtp.protocol import (
    BareLineEndings,
    ConnectionClosed,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    Reply,
    State,
)

from .helpers import connect, drain, feed, greeted, replies, talk


def test_command_line_of_exactly_512_octets_is_accepted() -> None:
    conn = connect()
    line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    _, lines = talk(conn, line)
    assert lines == ["250 2.0.0 OK"]


@pytest.mark.parametrize("pieces", [1, 7, 600])
def test_over_long_command_line_is_answered_once(pieces: int) -> None:
    conn = connect()
    line = b"NOOP " + b"x" * 5000 + b"\r\n"
    size = -(-len(line) // pieces)
    _, lines = talk(conn, *[line[i : i + size] for i in range(0, len(line), size)], b"NOOP\r\n")
    assert lines == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


def test_over_long_line_is_not_held_in_memory() -> None:
    conn = connect()
    for _ in range(100):
        feed(conn, b"x" * 100_000)
    # nothing answered yet: the line has not ended
    assert conn.data_to_send() == b""
    _, lines = talk(conn, b"\r\nNOOP\r\n")
    assert lines == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


def test_over_long_line_with_smuggled_command_after_it() -> None:
    conn = greeted()
    _, lines = talk(conn, b"NOOP " + b"x" * 600 + b"QUIT\r\n")
    assert lines == ["500 5.5.2 Line too long"]
    assert not conn.closed


def test_recipient_limit() -> None:
    conn = greeted(max_recipients=3)
    feed(conn, b"MAIL FROM:<a@b.example>\r\n")
    conn.data_to_send()
    events, lines = talk(conn, *[b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(5)])
    assert lines == ["250 2.1.5 Recipient OK"] * 3 + ["452 4.5.3 Too many recipients"] * 2
    assert len([e for e in events if isinstance(e, RcptTo)]) == 3


def test_recipient_limit_counts_only_accepted_recipients() -> None:
    from relate_smtp.protocol import UNKNOWN_USER

    conn = greeted(max_recipients=2)
    feed(conn, b"MAIL FROM:<a@b.example>\r\n")
    conn.data_to_send()
    verdicts = iter([UNKNOWN_USER, None, None, None])
    _, lines = talk(
        conn,
        *[b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(4)],
        policy=lambda d: next(verdicts),
    )
    assert lines == [
        "550 5.1.1 No such user here",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
        "452 4.5.3 Too many recipients",
    ]


def test_recipient_count_resets_with_the_transaction() -> None:
    conn = greeted(max_recipients=1)
    body = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
    _, lines = talk(conn, body, body)
    assert lines.count("250 2.1.5 Recipient OK") == 2


def test_recipients_over_the_limit_never_close_the_session() -> None:
    """RFC 5321 §4.5.3.1.10: 452 asks the client to go on with what was accepted."""
    conn = greeted(max_recipients=2, max_errors=3)
    rcpts = b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(50))
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\n")
    assert lines.count("452 4.5.3 Too many recipients") == 48
    assert lines[-2:] == ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 OK"]
    assert not conn.closed


def test_too_many_errors_closes_with_421() -> None:
    conn = connect(max_errors=3)
    events, lines = talk(conn, b"BAD\r\n" * 3)
    assert lines == ["500 5.5.2 Command not recognized"] * 3
    assert not conn.closed
    events, lines = talk(conn, b"BAD\r\nNOOP\r\n")
    assert lines == [
        "500 5.5.2 Command not recognized",
        "421 4.7.0 Too many errors, closing channel",
    ]
    assert events == [ConnectionClosed()]
    assert conn.closed
    assert conn.state is State.CLOSED


def test_every_kind_of_error_counts() -> None:
    conn = connect(max_errors=4, bare_line_endings=BareLineEndings.REJECT)
    _, lines = talk(
        conn,
        b"MAIL FROM:<a@b.example>\r\n",  # 503
        b"NOOP " + b"x" * 600 + b"\r\n",  # 500 too long
        b"EHLO\r\n",  # 501
        b"NOOP\n",  # 500 bare LF
        b"FOO\r\n",  # 500, the fifth: over the limit
    )
    assert lines[-1] == "421 4.7.0 Too many errors, closing channel"
    assert len(lines) == 6


def test_application_rejections_do_not_count() -> None:
    from relate_smtp.protocol import UNKNOWN_USER

    conn = greeted(max_errors=1)
    feed(conn, b"MAIL FROM:<a@b.example>\r\n")
    conn.data_to_send()
    _, lines = talk(
        conn, *[b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(5)], policy=lambda d: UNKNOWN_USER
    )
    assert lines == ["550 5.1.1 No such user here"] * 5
    assert not conn.closed


def test_pipelined_input_is_handled_in_order_and_batched() -> None:
    conn = greeted()
    batch = (
        b"MAIL FROM:<a@b.example>\r\n"
        b"RCPT TO:<c@d.example>\r\n"
        b"RCPT TO:<bad>\r\n"
        b"RCPT TO:<e@f.example>\r\n"
        b"DATA\r\n"
        b"body\r\n.\r\n"
        b"MAIL FROM:<>\r\n"
        b"RSET\r\n"
        b"QUIT\r\n"
    )
    conn.receive_data(batch)
    events = drain(conn)
    assert [type(e).__name__ for e in events] == [
        "MailFrom",
        "RcptTo",
        "RcptTo",
        "MessageStart",
        "MessageChunk",
        "MessageEnd",
        "MailFrom",
        "Reset",
        "Quit",
        "ConnectionClosed",
    ]
    assert replies(conn.data_to_send()) == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "501 5.1.3 Bad recipient address syntax",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 OK",
        "250 2.1.0 Sender OK",
        "250 2.0.0 OK",
        "221 2.0.0 Bye",
    ]


def test_pipelined_replies_wait_for_each_decision() -> None:
    conn = greeted()
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert isinstance(conn.next_event(), MailFrom)
    assert conn.data_to_send() == b""  # nothing can be said before MAIL is answered
    conn.accept()
    assert conn.data_to_send() == b"250 2.1.0 Sender OK\r\n"
    assert isinstance(conn.next_event(), RcptTo)
    conn.accept()
    assert conn.data_to_send() == b"250 2.1.5 Recipient OK\r\n"


def mail_line(length: int, params: bytes = b"") -> bytes:
    """A MAIL line of exactly ``length`` octets, padded inside its AUTH= mailbox."""
    head = b"MAIL FROM:<a@b.example>" + params
    fixed = len(head + b" AUTH=<@example.org>\r\n")
    return head + b" AUTH=<" + b"x" * (length - fixed) + b"@example.org>\r\n"


def test_mail_line_with_auth_size_and_body_is_not_too_long() -> None:
    """RFC 4954 §3 (+500 for AUTH=) and RFC 1870 §3 (+26 for SIZE=) raise the MAIL limit."""
    conn = greeted()
    line = mail_line(554, b" SIZE=1000 BODY=8BITMIME")
    assert len(line) == 554
    events, lines = talk(conn, line)
    assert lines == ["250 2.1.0 Sender OK"]
    mail = next(e for e in events if isinstance(e, MailFrom))
    assert mail.size == 1000
    assert mail.auth is not None and mail.auth.endswith("@example.org>")


def test_mail_line_limit_adds_every_advertised_extension() -> None:
    # RFC 5321 §4.5.3.1.4 512, + SIZE 26 (RFC 1870), + AUTH 500 (RFC 4954),
    # + SMTPUTF8 10 (RFC 6531 §3.1), + BODY=BINARYMIME 16 (RFC 6152, RFC 3030).
    limit = 512 + 26 + 500 + 10 + 16
    assert ProtocolConfig().mail_line_limit(tls_active=False) == limit
    conn = greeted()
    _, lines = talk(conn, mail_line(limit, b" SIZE=1 SMTPUTF8 BODY=BINARYMIME"))
    assert lines == ["250 2.1.0 Sender OK"]
    conn = greeted()
    _, lines = talk(conn, mail_line(limit + 1), b"NOOP\r\n")
    assert lines == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


def test_only_advertised_extensions_raise_the_mail_limit() -> None:
    """AUTH's 500 octets count only while AUTH is offered on the channel."""
    line = mail_line(600)
    offered = greeted()
    _, lines = talk(offered, line)
    assert lines == ["250 2.1.0 Sender OK"]
    hidden = greeted(auth=False, auth_required=False, allow_insecure_auth=False)
    _, lines = talk(hidden, line)
    assert lines == ["500 5.5.2 Line too long"]
    bare = ProtocolConfig(auth_enabled=False, smtputf8=False, eightbitmime=False, chunking=False)
    assert bare.mail_line_limit(tls_active=True) == 512 + 26  # SIZE is always advertised


def test_rcpt_line_gets_no_extension_allowance() -> None:
    """No extension offered here (DSN is not) adds a RCPT parameter."""
    conn = greeted()
    feed(conn, b"MAIL FROM:<a@b.example>\r\n")
    conn.data_to_send()
    rcpt = b"RCPT TO:<" + b"r" * (513 - len(b"RCPT TO:<@d.example>\r\n")) + b"@d.example>\r\n"
    assert len(rcpt) == 513
    _, lines = talk(conn, rcpt)
    assert lines == ["500 5.5.2 Line too long"]


def test_rejected_recipients_close_the_session_past_their_limit() -> None:
    """Postfix's smtpd_hard_error_limit: a client cannot probe thousands of addresses."""
    from relate_smtp.protocol import UNKNOWN_USER

    conn = greeted()
    feed(conn, b"MAIL FROM:<a@b.example>\r\n")
    conn.data_to_send()
    rcpts = [b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(1000)]
    events, lines = talk(conn, *rcpts, policy=lambda d: UNKNOWN_USER)
    assert lines == ["550 5.1.1 No such user here"] * 21 + [
        "421 4.7.0 Too many rejected recipients, closing channel"
    ]
    assert len([e for e in events if isinstance(e, RcptTo)]) == 21
    assert conn.closed
    assert events[-1] == ConnectionClosed()


def test_each_delivered_message_clears_the_recipient_errors() -> None:
    """A mailing list with a few stale addresses per message is never cut off."""
    from relate_smtp.protocol import UNKNOWN_USER, Decision

    def policy(decision: Decision) -> Reply | None:
        stale = isinstance(decision, RcptTo) and decision.local_part.startswith("stale")
        return UNKNOWN_USER if stale else None

    conn = greeted(max_recipient_errors=5)
    stale = b"".join(b"RCPT TO:<stale%d@d.example>\r\n" % i for i in range(5))
    message = b"MAIL FROM:<list@b.example>\r\nRCPT TO:<ok@d.example>\r\n" + stale
    _, lines = talk(conn, *[message + b"DATA\r\nhello\r\n.\r\n"] * 10, policy=policy)
    assert lines.count("250 2.0.0 OK") == 10
    assert not conn.closed
    # Without a delivery in between, the sixth refusal is one too many.
    _, lines = talk(conn, message, stale[: stale.index(b"\n") + 1], policy=policy)
    assert lines[-1] == "421 4.7.0 Too many rejected recipients, closing channel"
    assert conn.closed
