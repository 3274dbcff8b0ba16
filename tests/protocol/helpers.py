"""Test helpers for the protocol core: drive a connection, read its replies.

``feed`` answers each Decision (accept by default, or as a policy says) and returns
the events; ``replies`` splits the bytes sent into reply lines; ``check_transcript``
runs a go-smtp style table of (client bytes, expected reply lines).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from relate_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    ConnectionClosed,
    Decision,
    Event,
    MessageChunk,
    ProtocolConfig,
    Reply,
    ServerConnection,
)

#: Given a decision, the reply to answer with; None accepts with the default reply.
Policy = Callable[[Decision], Reply | None]

PLAIN_USER_PASS = b"AHVzZXIAcGFzcw=="  # base64("\0user\0pass")


def accept_all(decision: Decision) -> Reply | None:
    return None


def answer(conn: ServerConnection, decision: Decision, policy: Policy = accept_all) -> None:
    reply = policy(decision)
    if reply is None:
        conn.accept()
    elif reply.code < 400:
        conn.accept(reply)
    else:
        conn.reject(reply)


def drain(conn: ServerConnection, policy: Policy = accept_all) -> list[Event]:
    """Pull events until the core needs data, is paused, or closed."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        assert isinstance(event, Event)
        events.append(event)
        if isinstance(event, Decision):
            answer(conn, event, policy)
        if isinstance(event, ConnectionClosed):
            return events


def feed(conn: ServerConnection, *chunks: bytes, policy: Policy = accept_all) -> list[Event]:
    """Feed each chunk in turn, draining events after each; return all events."""
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events.extend(drain(conn, policy))
    return events


def replies(data: bytes) -> list[str]:
    """Reply lines in ``data``, without their CRLF; every line must end in CRLF."""
    assert data == b"" or data.endswith(b"\r\n"), data
    return [line.decode() for line in data.split(b"\r\n")[:-1]]


def talk(
    conn: ServerConnection, *chunks: bytes, policy: Policy = accept_all
) -> tuple[list[Event], list[str]]:
    """Feed chunks; return the events and the reply lines sent in answer."""
    events = feed(conn, *chunks, policy=policy)
    return events, replies(conn.data_to_send())


def connect(**config: Any) -> ServerConnection:
    """A connection whose greeting has been read."""
    conn = ServerConnection(ProtocolConfig(**config))
    greeting = conn.data_to_send()
    assert greeting.startswith(b"220 ")
    return conn


def greeted(
    *, auth: bool = True, ehlo: bytes = b"EHLO client.example\r\n", **config: Any
) -> ServerConnection:
    """A connection after EHLO (and AUTH PLAIN when ``auth``), output drained."""
    conn = connect(**config)
    feed(conn, ehlo)
    if auth:
        events = feed(conn, b"AUTH PLAIN " + PLAIN_USER_PASS + b"\r\n")
        assert any(isinstance(e, AuthRequest) for e in events)
    conn.data_to_send()
    return conn


def in_transaction(**config: Any) -> ServerConnection:
    """A connection with MAIL and one RCPT accepted, output drained."""
    conn = greeted(**config)
    feed(conn, b"MAIL FROM:<sender@example.org>\r\n", b"RCPT TO:<rcpt@example.com>\r\n")
    conn.data_to_send()
    return conn


def check_transcript(
    conn: ServerConnection,
    steps: Iterable[tuple[bytes, list[str]]],
    policy: Policy = accept_all,
) -> list[Event]:
    """Run (client bytes, expected reply lines) steps; each expected line is a prefix."""
    events: list[Event] = []
    for client, expected in steps:
        events.extend(feed(conn, client, policy=policy))
        got = replies(conn.data_to_send())
        assert len(got) == len(expected), (client, got, expected)
        for line, prefix in zip(got, expected, strict=True):
            assert line.startswith(prefix), (client, got, expected)
    return events


def message_bytes(events: Iterable[Event]) -> bytes:
    """The message as the application would assemble it from MessageChunk events."""
    return b"".join(e.data for e in events if isinstance(e, MessageChunk))
