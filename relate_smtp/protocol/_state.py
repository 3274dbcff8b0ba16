"""Session states and the one table saying which command may come when.

Two rules, after h11's ``_state.py``:

1. `TRANSITIONS` is the only place that says where a command leads; the connection
   looks the state up, it never decides sequencing itself.
2. A (state, command) pair missing from the table is out of sequence: the core
   answers 503 5.5.1 (RFC 5321 §4.1.4), it never raises.
"""

from __future__ import annotations

import enum
from typing import Final

from . import _replies as replies
from ._replies import Reply


class State(enum.Enum):
    """Where a session is (RFC 5321 §3)."""

    #: Greeting sent; waiting for EHLO/HELO.
    CONNECTED = "CONNECTED"
    #: Greeted; no mail transaction.
    READY = "READY"
    #: Sender accepted; no recipient accepted yet.
    MAIL = "MAIL"
    #: At least one recipient accepted.
    RCPT = "RCPT"
    #: Reading a DATA body (until CRLF.CRLF and the answer to `MessageEnd`).
    DATA = "DATA"
    #: A BDAT message is in progress: reading a chunk or waiting for the next BDAT.
    BDAT = "BDAT"
    #: A SASL exchange (AUTH) is in progress.
    AUTH = "AUTH"
    #: STARTTLS accepted; waiting for the runtime's handshake (``tls_started``).
    TLS_HANDSHAKE = "TLS_HANDSHAKE"
    #: Finished: QUIT, peer EOF, abort or too many errors.
    CLOSED = "CLOSED"
    #: The application misused the API; the connection refuses further calls.
    ERROR = "ERROR"

    # Members are singletons compared by identity: hashing by identity keeps the
    # table lookups below in C (Enum's own __hash__ is Python code).
    __hash__ = object.__hash__


class Command(enum.Enum):
    """What moves a session: SMTP verbs, then the core's own steps."""

    HELO = "HELO"
    EHLO = "EHLO"
    AUTH = "AUTH"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    VRFY = "VRFY"
    HELP = "HELP"
    QUIT = "QUIT"
    # Not verbs: the ends of multi-step exchanges.
    MESSAGE_DONE = "message done"
    AUTH_DONE = "auth done"
    TLS_DONE = "tls done"

    __hash__ = object.__hash__  # as for State


S = State
C = Command

# Where each command leads once done (for a Decision: once accepted). Commands that
# change nothing (NOOP, VRFY, HELP) map a state to itself.
TRANSITIONS: Final[dict[tuple[State, Command], State]] = {
    (S.CONNECTED, C.EHLO): S.READY,
    (S.CONNECTED, C.HELO): S.READY,
    (S.CONNECTED, C.RSET): S.CONNECTED,
    (S.CONNECTED, C.NOOP): S.CONNECTED,
    (S.CONNECTED, C.VRFY): S.CONNECTED,
    (S.CONNECTED, C.HELP): S.CONNECTED,
    (S.CONNECTED, C.QUIT): S.CLOSED,
    (S.READY, C.EHLO): S.READY,
    (S.READY, C.HELO): S.READY,
    (S.READY, C.AUTH): S.AUTH,
    (S.READY, C.STARTTLS): S.TLS_HANDSHAKE,
    (S.READY, C.MAIL): S.MAIL,
    (S.READY, C.RSET): S.READY,
    (S.READY, C.NOOP): S.READY,
    (S.READY, C.VRFY): S.READY,
    (S.READY, C.HELP): S.READY,
    (S.READY, C.QUIT): S.CLOSED,
    # EHLO/HELO inside a transaction resets it (RFC 5321 §4.1.4).
    (S.MAIL, C.EHLO): S.READY,
    (S.MAIL, C.HELO): S.READY,
    (S.MAIL, C.RCPT): S.RCPT,
    (S.MAIL, C.RSET): S.READY,
    (S.MAIL, C.NOOP): S.MAIL,
    (S.MAIL, C.VRFY): S.MAIL,
    (S.MAIL, C.HELP): S.MAIL,
    (S.MAIL, C.QUIT): S.CLOSED,
    (S.RCPT, C.EHLO): S.READY,
    (S.RCPT, C.HELO): S.READY,
    (S.RCPT, C.RCPT): S.RCPT,
    (S.RCPT, C.DATA): S.DATA,
    (S.RCPT, C.BDAT): S.BDAT,
    (S.RCPT, C.RSET): S.READY,
    (S.RCPT, C.NOOP): S.RCPT,
    (S.RCPT, C.VRFY): S.RCPT,
    (S.RCPT, C.HELP): S.RCPT,
    (S.RCPT, C.QUIT): S.CLOSED,
    # Between BDAT chunks only BDAT, RSET, NOOP, QUIT and a resetting EHLO make sense
    # (RFC 3030 §2).
    (S.BDAT, C.BDAT): S.BDAT,
    (S.BDAT, C.EHLO): S.READY,
    (S.BDAT, C.HELO): S.READY,
    (S.BDAT, C.RSET): S.READY,
    (S.BDAT, C.NOOP): S.BDAT,
    (S.BDAT, C.QUIT): S.CLOSED,
    (S.DATA, C.MESSAGE_DONE): S.READY,
    (S.BDAT, C.MESSAGE_DONE): S.READY,
    (S.AUTH, C.AUTH_DONE): S.READY,
    (S.TLS_HANDSHAKE, C.TLS_DONE): S.CONNECTED,
}

#: States in which a message body is being received or assembled.
MESSAGE_STATES: Final = frozenset({S.DATA, S.BDAT})


def out_of_sequence(state: State, command: Command) -> Reply:
    """The 503 for a command the table does not allow, worded to help the client."""
    if state is S.CONNECTED:
        return replies.SEND_HELLO_FIRST
    if command is C.AUTH:
        return replies.AUTH_IN_TRANSACTION
    if command is C.MAIL and state in (S.MAIL, S.RCPT):
        return replies.NESTED_MAIL
    if command in (C.RCPT, C.DATA, C.BDAT) and state is S.READY:
        return replies.NEED_MAIL
    if command in (C.DATA, C.BDAT) and state is S.MAIL:
        return replies.NO_VALID_RECIPIENTS
    return replies.BAD_SEQUENCE
