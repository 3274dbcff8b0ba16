"""Events: what the peer did, as small immutable values.

Only the core builds events, so they carry no validators. Events the application must
answer (with ``accept``/``reject``) subclass `Decision`.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from ._replies import Reply


class Pending(enum.Enum):
    """What `next_event` returns when it has no event to give."""

    #: Feed more bytes with ``receive_data``.
    NEED_DATA = "NEED_DATA"
    #: STARTTLS was accepted: do the handshake, then call ``tls_started``.
    PAUSED = "PAUSED"


NEED_DATA = Pending.NEED_DATA
PAUSED = Pending.PAUSED


class BodyType(enum.Enum):
    """The MAIL FROM ``BODY=`` parameter (RFC 6152, RFC 3030 §3)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"
    BINARY_MIME = "BINARYMIME"


@attrs.frozen(kw_only=True)
class Event:
    """Base class of everything `next_event` returns besides a `Pending` value."""


@attrs.frozen(kw_only=True)
class Decision(Event):
    """An event the application must answer before asking for the next one."""


@attrs.frozen(kw_only=True)
class Hello(Decision):
    """EHLO (``extended``) or HELO; accepting sends the capability list or HELO line."""

    extended: bool
    domain: str


@attrs.frozen(kw_only=True)
class AuthRequest(Decision):
    """Complete AUTH credentials; accepting authenticates the session (RFC 4954)."""

    mechanism: str
    authorization_id: str
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class MailFrom(Decision):
    """MAIL FROM with its parameters parsed (RFC 5321 §4.1.1.2).

    ``address`` is "" for the null path ``<>``. ``local_part`` is as written (a quoted
    local part keeps its quotes); ``domain`` may be an address literal such as
    ``[192.0.2.1]``. ``source_route`` holds an RFC 5321 A-d-l, which is accepted
    syntactically and reported so the application can refuse it.
    """

    address: str
    local_part: str
    domain: str
    source_route: tuple[str, ...] = ()
    size: int | None = None
    body: BodyType | None = None
    smtputf8: bool = False
    auth: str | None = None


@attrs.frozen(kw_only=True)
class RcptTo(Decision):
    """RCPT TO (RFC 5321 §4.1.1.3); ``<postmaster>`` has local part "postmaster", no domain."""

    address: str
    local_part: str
    domain: str
    source_route: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class StartTLS(Decision):
    """STARTTLS (RFC 3207); after accepting, `next_event` is PAUSED until ``tls_started``."""


@attrs.frozen(kw_only=True)
class MessageStart(Event):
    """A message body begins: after DATA (the core sent 354) or the first BDAT chunk."""

    chunked: bool


@attrs.frozen(kw_only=True)
class MessageChunk(Event):
    """Message bytes, dot-unstuffed for DATA; concatenated they form the message."""

    data: bytes


@attrs.frozen(kw_only=True)
class MessageEnd(Decision):
    """The message is complete; ``size`` is its length in octets as delivered in chunks."""

    size: int


@attrs.frozen(kw_only=True)
class MessageAborted(Event):
    """The core refused the message and sent ``reply``; drop the chunks collected so far.

    The transaction is over, as after a `Reset`.
    """

    reply: Reply


@attrs.frozen(kw_only=True)
class Reset(Event):
    """The transaction was dropped: RSET, or EHLO/HELO in the middle of one."""


@attrs.frozen(kw_only=True)
class Quit(Event):
    """QUIT: the core queued 221; `ConnectionClosed` follows."""


@attrs.frozen(kw_only=True)
class ConnectionClosed(Event):
    """Terminal: peer EOF, QUIT, ``abort``, or too many errors. Returned forever after.

    A message still in progress is abandoned.
    """


#: Every concrete decision.
AnyDecision = Hello | AuthRequest | MailFrom | RcptTo | StartTLS | MessageEnd


@attrs.frozen
class AnswerCodes:
    """The reply codes that can answer one kind of decision."""

    accept: frozenset[int]
    reject: frozenset[int]


# RFC 5321 §4.3.2: any command may also be answered 421, 500 or 501.
_ANY = frozenset({421, 500, 501})
# RFC 4954 §6: 530 to a command that needs authentication first.
_AUTH_FIRST = frozenset({530})

#: What `accept`/`reject` may answer each decision with: RFC 5321 §4.3.2's table and the
#: codes the extensions add. Anything else (354 to RCPT, 250 to AUTH) is a bug.
ANSWER_CODES: Final[dict[type[Decision], AnswerCodes]] = {
    Hello: AnswerCodes(frozenset({250}), _ANY | {502, 504, 550}),
    # RFC 4954 §4 and §6.
    AuthRequest: AnswerCodes(frozenset({235}), _ANY | {432, 454, 504, 534, 535, 538}),
    MailFrom: AnswerCodes(
        frozenset({250}), _ANY | _AUTH_FIRST | {451, 452, 455, 503, 550, 552, 553, 555}
    ),
    RcptTo: AnswerCodes(
        frozenset({250, 251}),
        _ANY | _AUTH_FIRST | {450, 451, 452, 455, 503, 550, 551, 552, 553, 555},
    ),
    StartTLS: AnswerCodes(frozenset({220}), _ANY | {454}),  # RFC 3207 §4
    # After the end of data (DATA, or BDAT LAST per RFC 3030 §2).
    MessageEnd: AnswerCodes(frozenset({250}), frozenset({421, 450, 451, 452, 550, 552, 554})),
}

#: Every concrete event, so that a ``match`` over them can end in ``assert_never``.
AnyEvent = (
    Hello
    | AuthRequest
    | MailFrom
    | RcptTo
    | StartTLS
    | MessageStart
    | MessageChunk
    | MessageEnd
    | MessageAborted
    | Reset
    | Quit
    | ConnectionClosed
)
