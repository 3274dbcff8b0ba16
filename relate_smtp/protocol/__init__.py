"""A sans-IO SMTP server: feed it bytes and answers, get events and bytes back.

No sockets, TLS, clocks or tasks here (after h11): the runtime reads, writes and
times; this package only knows SMTP (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, BINARYMIME, STARTTLS and AUTH)::

    conn = ServerConnection(ProtocolConfig(hostname="mx.example.com"))
    send(conn.data_to_send())                  # the greeting
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            send(conn.data_to_send())
            conn.receive_data(recv())
        elif isinstance(event, Decision):
            conn.accept()                      # or conn.reject(reply)
        ...
"""

from ._config import BareLineEndings, ProtocolConfig
from ._connection import ServerConnection
from ._errors import LocalProtocolError, ProtocolError
from ._events import (
    NEED_DATA,
    PAUSED,
    AnyEvent,
    AuthRequest,
    BodyType,
    ConnectionClosed,
    Decision,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    Pending,
    Quit,
    RcptTo,
    Reset,
    StartTLS,
)
from ._replies import (
    ATTACHMENT_TOO_BIG,
    AUTH_FAILED,
    AUTH_REQUIRED,
    AUTH_SUCCEEDED,
    AUTH_TEMPORARY_FAILURE,
    DATA_TOO_SLOW,
    INSUFFICIENT_RESOURCES,
    INTERNAL_ERROR,
    LOCAL_ERROR,
    MESSAGE_TOO_BIG,
    MESSAGE_TOO_COMPLEX_NOW,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    SHUTTING_DOWN,
    TIMEOUT,
    TLS_NOT_AVAILABLE,
    TOO_MANY_CONNECTIONS,
    UNKNOWN_USER,
    Reply,
    message_accepted,
    mime_limit_exceeded,
    sender_not_authenticated,
)
from ._state import State

__all__ = [
    "ATTACHMENT_TOO_BIG",
    "AUTH_FAILED",
    "AUTH_REQUIRED",
    "AUTH_SUCCEEDED",
    "AUTH_TEMPORARY_FAILURE",
    "DATA_TOO_SLOW",
    "INSUFFICIENT_RESOURCES",
    "INTERNAL_ERROR",
    "LOCAL_ERROR",
    "MESSAGE_TOO_BIG",
    "MESSAGE_TOO_COMPLEX_NOW",
    "NEED_DATA",
    "PAUSED",
    "RELAY_DENIED",
    "SENDER_NOT_OWNED",
    "SHUTTING_DOWN",
    "TIMEOUT",
    "TLS_NOT_AVAILABLE",
    "TOO_MANY_CONNECTIONS",
    "UNKNOWN_USER",
    "AnyEvent",
    "AuthRequest",
    "BareLineEndings",
    "BodyType",
    "ConnectionClosed",
    "Decision",
    "Event",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "MessageAborted",
    "MessageChunk",
    "MessageEnd",
    "MessageStart",
    "Pending",
    "ProtocolConfig",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "Reply",
    "Reset",
    "ServerConnection",
    "StartTLS",
    "State",
    "message_accepted",
    "mime_limit_exceeded",
    "sender_not_authenticated",
]
