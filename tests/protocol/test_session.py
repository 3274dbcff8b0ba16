"""Whole sessions and every command in every command-reading state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relate_smtp.protocol import (
    ConnectionClosed,
    Decision,
    Hello,
    MailFrom,
    MessageEnd,
    MessageStart,
    ProtocolConfig,
    Quit,
    RcptTo,
    Reply,
    Reset,
    ServerConnection,
    State,
)

from .helpers import check_transcript, connect, feed, greeted, message_bytes, replies, talk


def test_greeting_is_queued_at_construction() -> None:
    conn = ServerConnection(ProtocolConfig(hostname="mx.example.com"))
    assert conn.data_to_send() == b"220 mx.example.com ESMTP\r\n"
    assert conn.data_to_send() == b""
    assert conn.state is State.CONNECTED


def test_full_session_transcript() -> None:
    conn = connect(auth_required=False)
    events = check_transcript(
        conn,
        [
            (
                b"EHLO client.example\r\n",
                ["250-localhost"] + ["250-"] * 7 + ["250 AUTH PLAIN LOGIN"],
            ),
            (b"MAIL FROM:<alice@example.org>\r\n", ["250 2.1.0"]),
            (b"RCPT TO:<bob@example.com>\r\n", ["250 2.1.5"]),
            (b"DATA\r\n", ["354 "]),
            (b"Subject: hi\r\n\r\nHello\r\n.\r\n", ["250 2.0.0"]),
            (b"QUIT\r\n", ["221 2.0.0"]),
        ],
    )
    kinds = [type(e) for e in events]
    assert kinds[:3] == [Hello, MailFrom, RcptTo]
    assert MessageStart in kinds and MessageEnd in kinds
    assert kinds[-2:] == [Quit, ConnectionClosed]
    assert message_bytes(events) == b"Subject: hi\r\n\r\nHello\r\n"
    assert conn.closed


def test_ehlo_lists_capabilities_in_order() -> None:
    conn = connect()
    _, lines = talk(conn, b"EHLO client.example\r\n")
    assert lines == [
        "250-localhost",
        "250-SIZE 52428800",
        "250-PIPELINING",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250-BINARYMIME",
        "250 AUTH PLAIN LOGIN",
    ]
    assert conn.hello_name == "client.example"
    assert conn.state is State.READY


def test_helo_gets_one_line_without_enhanced_code() -> None:
    conn = connect(hostname="mx.example.com")
    events, lines = talk(conn, b"HELO client.example\r\n")
    assert events == [Hello(extended=False, domain="client.example")]
    assert lines == ["250 mx.example.com"]


@pytest.mark.parametrize(
    ("config", "present", "absent"),
    [
        ({"max_message_size": 0}, ["250-SIZE"], ["SIZE 0"]),
        ({"tls_available": True}, ["STARTTLS"], []),
        ({"tls_available": True, "tls_active": True}, [], ["STARTTLS"]),
        ({"auth_enabled": False}, [], ["AUTH"]),
        ({"allow_insecure_auth": False}, [], ["AUTH"]),
        ({"allow_insecure_auth": False, "tls_active": True}, ["AUTH PLAIN LOGIN"], []),
        ({"chunking": False}, [], ["CHUNKING", "BINARYMIME"]),
        ({"binarymime": False}, ["CHUNKING"], ["BINARYMIME"]),
        (
            {"pipelining": False, "eightbitmime": False, "smtputf8": False},
            [],
            ["PIPELINING", "8BITMIME", "SMTPUTF8"],
        ),
    ],
)
def test_ehlo_capabilities_follow_config(
    config: dict[str, object], present: list[str], absent: list[str]
) -> None:
    conn = connect(**config)
    _, lines = talk(conn, b"EHLO c\r\n")
    text = "\n".join(lines)
    for capability in present:
        assert capability in text
    for capability in absent:
        assert capability not in text


def test_rejected_hello_keeps_the_session_unnamed() -> None:
    from relate_smtp.protocol import RELAY_DENIED

    conn = connect()
    _, lines = talk(conn, b"EHLO bad.example\r\n", policy=lambda d: RELAY_DENIED)
    assert lines == ["550 5.7.1 Relay access denied"]
    assert conn.state is State.CONNECTED
    assert conn.hello_name is None
    _, lines = talk(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert lines[0].startswith("503 5.5.1")


def test_ehlo_without_domain_is_a_syntax_error() -> None:
    conn = connect()
    _, lines = talk(conn, b"EHLO\r\n", b"HELO \r\n", b"EHLO a b\r\n")
    assert lines == [
        "501 5.5.4 Syntax: EHLO hostname",
        "501 5.5.4 Syntax: HELO hostname",
        "501 5.5.4 Syntax: EHLO hostname",
    ]


def test_accepted_ehlo_inside_a_transaction_resets_it() -> None:
    conn = greeted()
    feed(conn, b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n")
    conn.data_to_send()
    events, lines = talk(conn, b"EHLO again.example\r\n")
    assert [type(e) for e in events] == [Hello, Reset]  # RFC 5321 §4.1.4: once accepted
    assert lines[0] == "250-localhost"
    assert conn.state is State.READY
    assert conn.authenticated  # a second EHLO does not forget AUTH
    _, lines = talk(conn, b"RCPT TO:<c@d.example>\r\n")
    assert lines == ["503 5.5.1 Need MAIL command first"]


def test_rejected_ehlo_inside_a_transaction_keeps_it() -> None:
    """RFC 5321 §4.1.4: the reset happens only if the EHLO is acceptable."""
    conn = greeted()
    feed(conn, b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n")
    conn.data_to_send()
    refused = Reply(550, "5.7.1", ("Bad HELO name",))
    events, lines = talk(
        conn, b"EHLO bad.example\r\n", policy=lambda d: refused if isinstance(d, Hello) else None
    )
    assert [type(e) for e in events] == [Hello]  # no Reset
    assert lines == ["550 5.7.1 Bad HELO name"]
    assert conn.state is State.RCPT
    _, lines = talk(conn, b"RCPT TO:<e@f.example>\r\nDATA\r\nhi\r\n.\r\n")
    assert lines == [
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 OK",
    ]


def test_verbs_and_parameters_are_case_insensitive() -> None:
    conn = connect(auth_required=False)
    events, lines = talk(
        conn,
        b"ehlo c\r\n",
        b"mail from:<a@b.example> size=10 body=8bitmime\r\n",
        b"rCpT tO:<c@d.example>\r\n",
        b"rset\r\n",
        b"noop\r\n",
    )
    mail = next(e for e in events if isinstance(e, MailFrom))
    assert mail.size == 10
    assert lines[-4:] == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "250 2.0.0 OK",
        "250 2.0.0 OK",
    ]


def test_simple_commands() -> None:
    conn = connect()
    check_transcript(
        conn,
        [
            (b"NOOP\r\n", ["250 2.0.0 OK"]),
            (b"NOOP anything goes\r\n", ["250 2.0.0 OK"]),
            (b"HELP\r\n", ["214 2.0.0"]),
            (b"HELP MAIL\r\n", ["214 2.0.0"]),
            (b"VRFY someone\r\n", ["252 2.5.0"]),
            (b"VRFY\r\n", ["501 5.5.4"]),
            (b"RSET\r\n", ["250 2.0.0 OK"]),
            (b"RSET now\r\n", ["501 5.5.4"]),
            (b"FOO\r\n", ["500 5.5.2 Command not recognized"]),
            (b"\r\n", ["500 5.5.2"]),
            (b"QUIT now\r\n", ["501 5.5.4"]),
            (b"QUIT\r\n", ["221 2.0.0 Bye"]),
        ],
    )


def test_rset_emits_reset_and_ends_the_transaction() -> None:
    conn = greeted()
    feed(conn, b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n")
    conn.data_to_send()
    events, lines = talk(conn, b"RSET\r\n")
    assert events == [Reset()]
    assert lines == ["250 2.0.0 OK"]
    assert conn.state is State.READY
    _, lines = talk(conn, b"DATA\r\n")
    assert lines == ["503 5.5.1 Need MAIL command first"]


# --- every command in every command-reading state ---------------------------------

COMMANDS: dict[str, bytes] = {
    "EHLO": b"EHLO c.example\r\n",
    "HELO": b"HELO c.example\r\n",
    "AUTH": b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
    "STARTTLS": b"STARTTLS\r\n",
    "MAIL": b"MAIL FROM:<a@b.example>\r\n",
    "RCPT": b"RCPT TO:<c@d.example>\r\n",
    "DATA": b"DATA\r\n",
    "BDAT": b"BDAT 0 LAST\r\n",
    "RSET": b"RSET\r\n",
    "NOOP": b"NOOP\r\n",
    "VRFY": b"VRFY c\r\n",
    "HELP": b"HELP\r\n",
    "QUIT": b"QUIT\r\n",
}

OK_FIRST_LINE = {
    "EHLO": "250-localhost",
    "HELO": "250 localhost",
    "AUTH": "235 2.7.0",
    "STARTTLS": "220 2.0.0",
    "MAIL": "250 2.1.0",
    "RCPT": "250 2.1.5",
    "DATA": "354 ",
    "BDAT": "250 2.0.0 OK",
    "RSET": "250 2.0.0",
    "NOOP": "250 2.0.0",
    "VRFY": "252 2.5.0",
    "HELP": "214 2.0.0",
    "QUIT": "221 2.0.0",
}

ALLOWED = {
    State.CONNECTED: {"EHLO", "HELO", "RSET", "NOOP", "VRFY", "HELP", "QUIT"},
    State.READY: {
        "EHLO",
        "HELO",
        "AUTH",
        "STARTTLS",
        "MAIL",
        "RSET",
        "NOOP",
        "VRFY",
        "HELP",
        "QUIT",
    },
    State.MAIL: {"EHLO", "HELO", "RCPT", "RSET", "NOOP", "VRFY", "HELP", "QUIT"},
    State.RCPT: {"EHLO", "HELO", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "HELP", "QUIT"},
    State.BDAT: {"EHLO", "HELO", "BDAT", "RSET", "NOOP", "QUIT"},
}


def _in_state(state: State) -> ServerConnection:
    conn = connect(auth_required=False, tls_available=True)
    setup: dict[State, list[bytes]] = {
        State.CONNECTED: [],
        State.READY: [b"EHLO c\r\n"],
        State.MAIL: [b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n"],
        State.RCPT: [b"EHLO c\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n"],
        State.BDAT: [
            b"EHLO c\r\n",
            b"MAIL FROM:<a@b.example>\r\n",
            b"RCPT TO:<c@d.example>\r\n",
            b"BDAT 3\r\nabc",
        ],
    }
    feed(conn, *setup[state])
    conn.data_to_send()
    assert conn.state is state
    return conn


@pytest.mark.parametrize("state", list(ALLOWED))
@pytest.mark.parametrize("verb", list(COMMANDS))
def test_every_command_in_every_state(state: State, verb: str) -> None:
    conn = _in_state(state)
    _, lines = talk(conn, COMMANDS[verb])
    if verb in ALLOWED[state]:
        assert lines[0].startswith(OK_FIRST_LINE[verb]), lines
    else:
        assert len(lines) == 1 and lines[0].startswith("503 5.5.1"), lines
        assert conn.state is state


@pytest.mark.parametrize(
    ("state", "verb", "wording"),
    [
        (State.CONNECTED, "MAIL", "Send EHLO or HELO first"),
        (State.READY, "RCPT", "Need MAIL command first"),
        (State.READY, "DATA", "Need MAIL command first"),
        (State.MAIL, "MAIL", "Sender already specified"),
        (State.MAIL, "DATA", "No valid recipients"),
        (State.MAIL, "AUTH", "AUTH not permitted during a mail transaction"),
    ],
)
def test_bad_sequence_wording(state: State, verb: str, wording: str) -> None:
    conn = _in_state(state)
    _, lines = talk(conn, COMMANDS[verb])
    assert lines == [f"503 5.5.1 {wording}"]


def test_data_needs_an_accepted_recipient() -> None:
    from relate_smtp.protocol import UNKNOWN_USER

    conn = greeted()
    _, lines = talk(
        conn,
        b"MAIL FROM:<a@b.example>\r\n",
        b"RCPT TO:<nobody@d.example>\r\n",
        b"DATA\r\n",
        policy=lambda d: UNKNOWN_USER if isinstance(d, RcptTo) else None,
    )
    assert lines == [
        "250 2.1.0 Sender OK",
        "550 5.1.1 No such user here",
        "503 5.5.1 No valid recipients",
    ]
    assert conn.state is State.MAIL


def test_rejected_mail_leaves_no_transaction() -> None:
    from relate_smtp.protocol import SENDER_NOT_OWNED

    conn = greeted()
    _, lines = talk(
        conn,
        b"MAIL FROM:<a@b.example>\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        policy=lambda d: SENDER_NOT_OWNED if isinstance(d, MailFrom) else None,
    )
    assert lines == [
        "553 5.7.1 Sender address not owned by the authenticated user",
        "503 5.5.1 Need MAIL command first",
    ]


def test_message_end_reply_comes_from_the_application() -> None:
    from relate_smtp.protocol import LOCAL_ERROR, message_accepted

    conn = greeted()
    replies_given: Iterator[Reply | None] = iter(
        [None, None, message_accepted("Q1"), None, None, LOCAL_ERROR]
    )

    def policy(decision: Decision) -> Reply | None:
        return next(replies_given)

    body = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
    _, lines = talk(conn, body, body, policy=policy)
    assert lines == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 OK: queued as Q1",
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
        "451 4.3.0 Temporary local problem, try again later",
    ]
    assert conn.state is State.READY


def test_eof_closes_after_buffered_commands() -> None:
    conn = connect()
    conn.receive_data(b"NOOP\r\nNOOP\r\nNOO")
    conn.receive_data(b"")
    events = feed(conn)
    assert events == []
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert replies(conn.data_to_send()) == ["250 2.0.0 OK", "250 2.0.0 OK"]
    assert conn.closed
    assert isinstance(conn.next_event(), ConnectionClosed)  # forever


def test_eof_in_the_middle_of_a_message_closes() -> None:
    conn = greeted()
    events = feed(conn, b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\npartial\r\n")
    assert conn.in_message
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert not conn.in_message
    assert any(isinstance(e, MessageStart) for e in events)


def test_quit_emits_quit_then_connection_closed_and_ignores_the_rest() -> None:
    conn = greeted()
    events, lines = talk(conn, b"QUIT\r\nNOOP\r\n")
    assert events == [Quit(), ConnectionClosed()]
    assert lines == ["221 2.0.0 Bye"]
    conn.receive_data(b"NOOP\r\n")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send() == b""
