"""Property-based tests of the protocol core (hypothesis).

1. Chunking invariance: any split of a session's bytes gives the same events (message
   bytes compared joined) and the same output as feeding it in one piece.
2. The state table is total: every (state, command) pair transitions or is answered.
3. A stateful model of a client sending valid and malformed input, with an application
   that accepts, rejects or aborts at random: one reply per complete command, in order,
   errors counted, buffers under their caps, nothing raises, closing is terminal.

The table test reads the core's private ``TRANSITIONS`` (it is what is under test) and
the buffer checks read ``ServerConnection._buffer`` and ``DotReader._held`` read-only,
whose bounds are documented in ``_buffer.py`` and ``_data.py``.
"""

from __future__ import annotations

import base64
import itertools
import random
import re
from collections.abc import Callable, Sequence
from typing import Final

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relate_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    SHUTTING_DOWN,
    TIMEOUT,
    AuthRequest,
    BareLineEndings,
    ConnectionClosed,
    Decision,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    ProtocolConfig,
    RcptTo,
    Reply,
    ServerConnection,
    StartTLS,
    State,
    message_accepted,
)
from relate_smtp.protocol._events import ANSWER_CODES
from relate_smtp.protocol._state import TRANSITIONS, Command

CRLF: Final = b"\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_CREDENTIALS: Final = b64(b"\0user\0pass")
USER: Final = b64(b"user")
PASSWORD: Final = b64(b"pass")

# --- reading replies ------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
#: Text of every reply the test application builds, to tell them from the core's own.
POLICY_MARK: Final = "(policy)"


def final_replies(data: bytes) -> list[str]:
    """The last line of each reply in ``data``, checking every line is well formed.

    Lines of one multi-line reply share their code (RFC 5321 §4.2.1); no reply may be
    left unfinished; 4xx/5xx replies carry an enhanced code of their class (RFC 2034).
    """
    assert data == b"" or data.endswith(CRLF), data
    finals: list[str] = []
    open_code: bytes | None = None
    for raw in data.split(CRLF)[:-1]:
        match = _REPLY_LINE.fullmatch(raw)
        assert match is not None, f"malformed reply line {raw!r}"
        code, separator, text = match.groups()
        assert open_code is None or code == open_code, data
        if separator == b"-":
            open_code = code
            continue
        open_code = None
        line = raw.decode()
        if code[0] in b"45":
            enhanced = _ENHANCED.match(text.decode())
            assert enhanced is not None, f"no enhanced status code in {line!r}"
            assert enhanced[1] == line[0], line
        finals.append(line)
    assert open_code is None, f"unfinished multi-line reply in {data!r}"
    return finals


def is_error(line: str) -> bool:
    return line[0] in "45"


# --- driving a connection -------------------------------------------------------------


def deterministic_policy(decision: Decision) -> Reply | None:
    """Accept, except senders at refused.example and recipients named bad*."""
    match decision:
        case MailFrom(domain="refused.example"):
            return Reply(550, "5.7.1", (f"sender refused {POLICY_MARK}",))
        case RcptTo(local_part=local) if local.startswith("bad"):
            return Reply(550, "5.1.1", (f"no such user {POLICY_MARK}",))
        case MessageEnd(size=size):
            return message_accepted(f"Q{size}")
        case _:
            return None


def refusal(decision: Decision) -> Reply:
    """A policy refusal whose code fits the decision (the core checks that it does)."""
    match decision:
        case AuthRequest():
            return Reply(535, "5.7.8", (f"refused {POLICY_MARK}",))
        case StartTLS():
            return Reply(454, "4.7.0", (f"refused {POLICY_MARK}",))
        case _:
            return Reply(550, "5.7.1", (f"refused {POLICY_MARK}",))


def line_cap(config: ProtocolConfig) -> int:
    """The most the receive buffer may hold: the longest line limit."""
    mail = config.mail_line_limit(tls_active=True)
    return max(config.max_command_line, config.max_auth_line, mail)


def answer(conn: ServerConnection, reply: Reply | None) -> None:
    if reply is None:
        conn.accept()
    elif reply.code < 400:
        conn.accept(reply)
    else:
        conn.reject(reply)


def drain(
    conn: ServerConnection, policy: Callable[[Decision], Reply | None] = deterministic_policy
) -> list[Event]:
    """Events until NEED_DATA, PAUSED or ConnectionClosed, answering each decision."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        assert isinstance(event, Event), event
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events
        if isinstance(event, Decision):
            answer(conn, policy(event))


def run_pieces(pieces: Sequence[bytes], config: ProtocolConfig) -> tuple[list[Event], bytes]:
    """Feed ``pieces`` one by one, then EOF, as a runtime would until ConnectionClosed.

    Returns all events and all output.
    """
    conn = ServerConnection(config)
    events: list[Event] = []
    out = [conn.data_to_send()]
    for piece in [*(p for p in pieces if p), b""]:  # only the last b"" means EOF
        conn.receive_data(piece)
        events += drain(conn)
        out.append(conn.data_to_send())
        if events and isinstance(events[-1], ConnectionClosed):
            break
    assert isinstance(events[-1], ConnectionClosed)
    return events, b"".join(out)


#: How to cut input into reads: a stride (0 for none) and positions taken modulo the
#: input's length + 1. Strides put cuts inside every marker; positions anywhere.
Split = tuple[int, list[int]]


def split_at(data: bytes, split: Split) -> list[bytes]:
    """``data`` cut every ``stride`` bytes and at each position of ``split``."""
    stride, positions = split
    points = {p % (len(data) + 1) for p in positions}
    if stride:
        points.update(range(stride, len(data), stride))
    edges = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def canonical(events: Sequence[Event]) -> list[Event]:
    """Events with each message's chunks joined, and chunks of aborted messages dropped.

    Chunk boundaries follow the reads; an aborted message was delivered up to wherever
    the core noticed, and the application drops it, so neither is compared.
    """
    out: list[Event] = []
    pending = bytearray()
    message_at: int | None = None
    for event in events:
        if isinstance(event, MessageChunk):
            pending += event.data
            continue
        if pending:
            out.append(MessageChunk(data=bytes(pending)))
            pending.clear()
        if isinstance(event, MessageStart):
            message_at = len(out)
        if isinstance(event, MessageAborted) and message_at is not None:
            del out[message_at + 1 :]
        if isinstance(event, MessageEnd | MessageAborted):
            message_at = None
        out.append(event)
    if pending:
        out.append(MessageChunk(data=bytes(pending)))
    return out


def messages(events: Sequence[Event]) -> list[bytes]:
    """The bytes of each message that reached MessageEnd."""
    found: list[bytes] = []
    current = bytearray()
    for event in events:
        if isinstance(event, MessageStart):
            current.clear()
        elif isinstance(event, MessageChunk):
            current += event.data
        elif isinstance(event, MessageEnd):
            assert event.size == len(current)
            found.append(bytes(current))
    return found


# --- strategies: valid sessions ---------------------------------------------------------

#: A body line: any bytes but CR and LF (8-bit and NUL included), often dotted.
body_line = st.one_of(
    st.binary(max_size=90).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b".", b"..", b".x", b"...", b"From me", b" .", b"\x00", b"\xc3\xa9"]),
)


def stuffed(lines: Sequence[bytes]) -> bytes:
    """The DATA wire form of ``lines``: dot-stuffed (RFC 5321 §4.5.2), then CRLF.CRLF."""
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)


@st.composite
def data_transfer(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(wire bytes, expected message) for a DATA transfer."""
    lines = draw(st.lists(body_line, max_size=12))
    return b"DATA\r\n" + stuffed(lines) + b".\r\n", b"".join(line + CRLF for line in lines)


@st.composite
def bdat_transfer(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(wire bytes, expected message) for BDAT chunks; content is binary, never parsed."""
    chunk = st.one_of(
        st.binary(max_size=60),
        st.sampled_from([b"\r\n.\r\n", b"QUIT\r\n", b"BDAT 5\r\n", b".\r\n"]),
    )
    chunks = draw(st.lists(chunk, min_size=1, max_size=4))
    wire = b"".join(
        b"BDAT %d%s\r\n%s" % (len(c), b" LAST" if i == len(chunks) - 1 else b"", c)
        for i, c in enumerate(chunks)
    )
    return wire, b"".join(chunks)


AUTH_EXCHANGES: Final = [
    b"AUTH PLAIN " + PLAIN_CREDENTIALS + CRLF,
    b"AUTH PLAIN\r\n" + PLAIN_CREDENTIALS + CRLF,
    b"AUTH LOGIN\r\n" + USER + CRLF + PASSWORD + CRLF,
    b"AUTH LOGIN " + USER + CRLF + PASSWORD + CRLF,
]
INTERLUDES: Final = [b"NOOP\r\n", b"HELP\r\n", b"VRFY someone\r\n", b"noop with args\r\n"]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A whole pipelined client session and the messages it delivers."""
    parts = [draw(st.sampled_from([b"EHLO client.example\r\n", b"helo client.example\r\n"]))]
    parts.append(draw(st.sampled_from(AUTH_EXCHANGES)))
    delivered: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        parts += draw(st.lists(st.sampled_from(INTERLUDES), max_size=2))
        sender = draw(st.sampled_from([b"<a@example.org>", b"<>", b"<refused@refused.example>"]))
        params = draw(st.sampled_from([b"", b" SIZE=1000", b" BODY=8BITMIME", b" SMTPUTF8"]))
        parts.append(b"MAIL FROM:" + sender + params + CRLF)
        names = draw(st.lists(st.sampled_from([b"bob", b"carol", b"bad"]), min_size=1, max_size=4))
        parts += [b"RCPT TO:<%s@example.com>\r\n" % name for name in names]
        wire, message = draw(st.one_of(data_transfer(), bdat_transfer()))
        # Without an accepted sender and recipient the body would be read as commands.
        accepted = b"refused" not in sender and any(n != b"bad" for n in names)
        if accepted and draw(st.booleans()):
            parts.append(wire)
            delivered.append(message)
        else:
            parts.append(b"RSET\r\n")
    if draw(st.booleans()):
        parts.append(b"QUIT\r\n")
    return b"".join(parts), delivered


#: Fragments of valid and malformed input for sessions that are not well behaved.
SOUP_TOKENS: Final = [
    b"EHLO c.example\r\n",
    b"HELO c.example\r\n",
    b"AUTH PLAIN " + PLAIN_CREDENTIALS + CRLF,
    b"AUTH LOGIN\r\n",
    USER + CRLF,
    b"*\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<bad@example.com>\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"..\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff\xfe",
    b"NOOP " + b"x" * 600 + CRLF,
    b"x" * 300,
]
soup_piece = st.one_of(st.sampled_from(SOUP_TOKENS), st.binary(max_size=20))
soup = st.lists(soup_piece, max_size=40).map(b"".join)

_positions = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40)
cut_points: st.SearchStrategy[Split] = st.tuples(st.sampled_from([0, 1, 2, 3, 5, 7]), _positions)
#: Coarser for the stateful test, whose units reach 13 kB (byte at a time is tested above).
unit_cuts: st.SearchStrategy[Split] = st.tuples(st.sampled_from([0, 5, 64]), _positions)


# --- property 1: chunking invariance ------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(session=sessions(), cuts=cut_points)
def test_any_chunking_of_a_session_gives_the_same_events_and_output(
    session: tuple[bytes, list[bytes]], cuts: Split
) -> None:
    wire, delivered = session
    config = ProtocolConfig()
    whole_events, whole_out = run_pieces([wire], config)
    assert messages(whole_events) == delivered
    events, out = run_pieces(split_at(wire, cuts), config)
    assert canonical(events) == canonical(whole_events)
    assert out == whole_out


@settings(max_examples=40, deadline=None)
@given(session=sessions())
def test_a_session_fed_byte_at_a_time_matches_one_piece(
    session: tuple[bytes, list[bytes]],
) -> None:
    wire, _ = session
    config = ProtocolConfig()
    whole_events, whole_out = run_pieces([wire], config)
    events, out = run_pieces([wire[i : i + 1] for i in range(len(wire))], config)
    assert canonical(events) == canonical(whole_events)
    assert out == whole_out


@settings(max_examples=200, deadline=None)
@given(
    data=soup,
    cuts=cut_points,
    mode=st.sampled_from(BareLineEndings),
    max_size=st.sampled_from([0, 40, 5000]),
    max_errors=st.sampled_from([3, 10]),
)
@example(
    data=b"EHLO c\r\nAUTH PLAIN " + PLAIN_CREDENTIALS + b"\r\nMAIL FROM:<a@b.c>\r\n"
    b"RCPT TO:<d@e.f>\r\nDATA\r\nab\r",
    cuts=(0, [80]),
    mode=BareLineEndings.NORMALIZE,
    max_size=0,
    max_errors=10,
).via("EOF inside DATA: the delivered prefix must not depend on the reads")
def test_any_chunking_of_arbitrary_input_gives_the_same_events_and_output(
    data: bytes, cuts: Split, mode: BareLineEndings, max_size: int, max_errors: int
) -> None:
    config = ProtocolConfig(
        bare_line_endings=mode, max_message_size=max_size, max_errors=max_errors
    )
    whole_events, whole_out = run_pieces([data], config)
    events, out = run_pieces(split_at(data, cuts), config)
    assert canonical(events) == canonical(whole_events)
    assert out == whole_out


def test_canonical_form_still_tells_different_messages_apart() -> None:
    one = [MessageStart(chunked=False), MessageChunk(data=b"ab"), MessageChunk(data=b"c")]
    other = [MessageStart(chunked=False), MessageChunk(data=b"a"), MessageChunk(data=b"bd")]
    assert canonical(one) == [MessageStart(chunked=False), MessageChunk(data=b"abc")]
    assert canonical(one) != canonical(other)


# --- property 2: the state table is total ---------------------------------------------

VERB_LINES: Final[dict[str, dict[str, bytes]]] = {
    # verb: {argument style: arguments}; "valid" is what a correct client sends.
    "EHLO": {"valid": b"client.example"},
    "HELO": {"valid": b"client.example"},
    "AUTH": {"valid": b"PLAIN " + PLAIN_CREDENTIALS},
    "STARTTLS": {"valid": b""},
    "MAIL": {"valid": b"FROM:<s@example.org>"},
    "RCPT": {"valid": b"TO:<r@example.com>"},
    "DATA": {"valid": b""},
    "BDAT": {"valid": b"0"},
    "RSET": {"valid": b""},
    "NOOP": {"valid": b""},
    "VRFY": {"valid": b"someone"},
    "HELP": {"valid": b""},
    "QUIT": {"valid": b""},
    "XYZZY": {"valid": b""},  # not a verb at all
}
ARG_STYLES: Final = ["valid", "none", "garbage"]
GARBAGE_ARGS: Final = b"\x00\xff<:>\x7f junk"


def command_line(verb: str, style: str, *, lower: bool = False) -> bytes:
    args = {"valid": VERB_LINES[verb]["valid"], "none": b"", "garbage": GARBAGE_ARGS}[style]
    name = verb.lower() if lower else verb
    return name.encode() + (b" " + args if args else b"") + CRLF


def drive_to(state: State, config: ProtocolConfig) -> ServerConnection:
    """A fresh connection brought into ``state`` by a correct client and application."""
    conn = ServerConnection(config)
    steps: dict[State, list[bytes]] = {
        State.CONNECTED: [],
        State.READY: [b"EHLO client.example\r\n"],
        State.AUTH: [b"EHLO client.example\r\n", b"AUTH LOGIN\r\n"],
        State.MAIL: [b"EHLO c.example\r\n", b"MAIL FROM:<s@example.org>\r\n"],
        State.RCPT: [b"EHLO c.example\r\n", b"MAIL FROM:<s@e.org>\r\n", b"RCPT TO:<r@e.com>\r\n"],
        State.DATA: [b"EHLO c\r\n", b"MAIL FROM:<s@e.org>\r\n", b"RCPT TO:<r@e.com>\r\nDATA\r\n"],
        State.BDAT: [b"EHLO c\r\n", b"MAIL FROM:<s@e.org>\r\n", b"RCPT TO:<r@e.com>\r\n"],
        State.TLS_HANDSHAKE: [b"EHLO client.example\r\n", b"STARTTLS\r\n"],
        State.CLOSED: [b"QUIT\r\n"],
        State.ERROR: [],
    }
    if state in (State.MAIL, State.RCPT, State.DATA, State.BDAT) and config.auth_enabled:
        steps[state].insert(1, b"AUTH PLAIN " + PLAIN_CREDENTIALS + CRLF)
    if state is State.BDAT:
        steps[state].append(b"BDAT 2\r\nab")
    for step in steps[state]:
        conn.receive_data(step)
        drain(conn)
    if state is State.ERROR:
        with pytest.raises(LocalProtocolError):
            conn.accept()  # no decision pending: misuse
    conn.data_to_send()
    assert conn.state is state
    return conn


def refused_by_configuration(
    conn: ServerConnection, command: Command, config: ProtocolConfig
) -> bool:
    """Whether a valid, in-sequence command is still refused for a documented reason."""
    match command:
        case Command.MAIL:
            return config.auth_enabled and config.auth_required and not conn.authenticated
        case Command.AUTH:
            return not config.auth_enabled or conn.authenticated
        case Command.STARTTLS:
            return not config.tls_available or conn.tls_active
        case Command.BDAT:
            return not config.chunking
        case _:
            return False


@settings(max_examples=600, deadline=None)
@given(
    state=st.sampled_from(State),
    verb=st.sampled_from(sorted(VERB_LINES)),
    style=st.sampled_from(ARG_STYLES),
    accepting=st.booleans(),
    lower=st.booleans(),
    auth_enabled=st.booleans(),
    auth_required=st.booleans(),
    tls_available=st.booleans(),
    chunking=st.booleans(),
)
def test_every_state_and_command_either_transitions_or_replies(
    state: State,
    verb: str,
    style: str,
    accepting: bool,
    lower: bool,
    auth_enabled: bool,
    auth_required: bool,
    tls_available: bool,
    chunking: bool,
) -> None:
    config = ProtocolConfig(
        auth_enabled=auth_enabled or state is State.AUTH,
        auth_required=auth_required,
        tls_available=tls_available or state is State.TLS_HANDSHAKE,
        chunking=chunking or state is State.BDAT,
    )
    check_command_in_state(config, state, verb, style, accepting=accepting, lower=lower)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("verb", sorted(VERB_LINES))
def test_table_is_total_for_every_pair(state: State, verb: str) -> None:
    """Every pair, exhaustively, with every feature offered."""
    config = ProtocolConfig(tls_available=True)
    for style in ARG_STYLES:
        for accepting in (True, False):
            check_command_in_state(config, state, verb, style, accepting=accepting)


def check_command_in_state(
    config: ProtocolConfig,
    state: State,
    verb: str,
    style: str,
    *,
    accepting: bool,
    lower: bool = False,
) -> None:
    """Send a command in ``state``: it transitions as the table says, or is answered."""
    conn = drive_to(state, config)
    line = command_line(verb, style, lower=lower)

    def policy(decision: Decision) -> Reply | None:
        return None if accepting else refusal(decision)

    if state is State.ERROR:
        with pytest.raises(LocalProtocolError):
            conn.receive_data(line)
        with pytest.raises(LocalProtocolError):
            conn.next_event()
        return

    conn.receive_data(line)
    events = drain(conn, policy)
    finals = final_replies(conn.data_to_send())
    after = conn.state
    decisions = [e for e in events if isinstance(e, Decision)]
    assert len(decisions) <= 1

    # No decision is left pending: answering again is misuse.
    with pytest.raises(LocalProtocolError):
        conn.accept()

    if state in (State.DATA, State.TLS_HANDSHAKE, State.CLOSED):
        # Body content, bytes before the handshake, or input after the end: never answered.
        assert finals == []
        assert after is state
        assert not decisions
        return

    assert len(finals) == 1, (state, line, finals)
    [reply] = finals
    if state is State.AUTH:
        # Any line is the SASL response: a 334 continuation or the end of the exchange.
        assert after is (State.AUTH if reply.startswith("334") else State.READY)
        return

    command = Command.__members__.get(verb)
    target = TRANSITIONS.get((state, command)) if command is not None else None
    if target is None:
        assert is_error(reply), (state, line, reply)
        assert after is state
        assert not decisions
        if command is None:
            assert reply.startswith("500 5.5.2")
        elif style == "valid" and not refused_by_configuration(conn, command, config):
            assert reply.startswith("503 5.5.1"), (state, line, reply)
        return

    assert command is not None
    if target is State.AUTH:
        target = TRANSITIONS[State.AUTH, Command.AUTH_DONE]  # PLAIN with initial response
    if not is_error(reply):
        assert after is target, (state, line, reply, after)
        return
    # A refused command changes nothing; a refused EHLO/HELO keeps the transaction too
    # (RFC 5321 §4.1.4 resets it only for an acceptable one).
    assert after is state, (state, line, reply)
    if style == "valid" and accepting:
        assert refused_by_configuration(conn, command, config), (state, line, reply)


# --- property 3: a stateful model of client and application ---------------------------------

ABORT: Final = SHUTTING_DOWN
REJECTIONS: Final = [
    Reply(550, "5.7.1", (f"refused {POLICY_MARK}",)),
    Reply(451, "4.3.0", (f"try later {POLICY_MARK}", f"really {POLICY_MARK}")),
    Reply(454, "4.7.0", (f"not now {POLICY_MARK}",)),
    Reply(535, "5.7.8", (f"bad credentials {POLICY_MARK}",)),
]
RECIPIENTS_421: Final = "421 4.7.0 Too many rejected recipients"
#: A rejection that also closes the session (RFC 5321 §3.8).
CLOSING_REJECTION: Final = Reply(421, "4.3.2", (f"going away {POLICY_MARK}",))
ACCEPT_REPLIES: Final[dict[type[Decision], Reply]] = {
    AuthRequest: Reply(235, "2.7.0", (f"welcome {POLICY_MARK}",)),
    StartTLS: Reply(220, "2.0.0", (f"go ahead {POLICY_MARK}",)),
}
ACCEPT_REPLY: Final = Reply(250, "2.0.0", (f"fine {POLICY_MARK}",))

VALID_ARGS: Final[dict[bytes, list[bytes]]] = {
    b"EHLO": [b"client.example"],
    b"HELO": [b"client.example"],
    b"MAIL": [
        b"FROM:<s@example.org>",
        b"FROM:<>",
        b"FROM:<s@example.org> SIZE=100",
        b"FROM:<s@example.org> SIZE=99999999999",
        b"FROM:<s@example.org> BODY=BINARYMIME",
        b"FROM:<s@example.org> BODY=8BITMIME SMTPUTF8",
        b"FROM:<\xc3\xa9@example.org> SMTPUTF8",
        b"FROM:<\xc3\xa9@example.org>",
        b"FROM:<s@[192.0.2.1]>",
        b'FROM:<"quoted local"@example.org>',
        b"FROM:<s@example.org> FOO=BAR",
        b"FROM:<s@example.org> AUTH=<>",
    ],
    b"RCPT": [b"TO:<r@example.com>", b"TO:<postmaster>", b"TO:<bad@example.com>", b"TO:<>"],
    b"AUTH": [
        b"PLAIN " + PLAIN_CREDENTIALS,
        b"PLAIN",
        b"LOGIN",
        b"LOGIN " + USER,
        b"CRAM-MD5",
        b"PLAIN !!!",
        b"PLAIN =",
    ],
    b"VRFY": [b"someone"],
    b"BDAT": [b"x", b"-1", b"5 FIRST", b"1.5", b""],  # malformed only: sizes are a rule
}
VERBS: Final = [
    *(c.value.encode() for c in Command if c.value.isupper()),
    b"ehlo",
    b"Mail",
    b"XYZZY",
    b"",
]
SASL_RESPONSES: Final = [USER, PASSWORD, PLAIN_CREDENTIALS, b"*", b"!!!", b"=", b"dXNlcg"]
ENDINGS: Final = [b"\r\n", b"\n", b"\r\r\n"]
no_lf = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
_VALID_BDAT = re.compile(rb"BDAT +[0-9]{1,20}(?: +LAST)? *", re.IGNORECASE)


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    """One line of client input, well formed or not, never a BDAT that would take a chunk."""
    kind = draw(st.sampled_from(["command", "sasl", "random"]))
    if kind == "random":
        content = draw(no_lf)
    elif kind == "sasl":
        content = draw(st.sampled_from(SASL_RESPONSES))
    else:
        verb = draw(st.sampled_from(VERBS))
        choices = VALID_ARGS.get(verb.upper(), [b""])
        args = draw(st.one_of(st.sampled_from(choices), no_lf))
        content = verb + (b" " + args if args else b"")
    if _VALID_BDAT.fullmatch(content.rstrip(b"\r")):
        content = b"X" + content
    return content + draw(st.sampled_from(ENDINGS))


#: Lines for a pipelined batch; None marks a line whose reply is not predicted.
PIPELINE_LINES: Final[list[tuple[bytes, str | None]]] = [
    (b"NOOP\r\n", "250 2.0.0 OK"),
    (b"XYZZY\r\n", "500 5.5.2 Command not recognized"),
    (b"RSET\r\n", None),
    (b"HELP\r\n", None),
    (b"VRFY someone\r\n", None),
    (b"EHLO client.example\r\n", None),
    (b"MAIL FROM:<s@example.org>\r\n", None),
    (b"RCPT TO:<r@example.com>\r\n", None),
    (b"RCPT TO:<bad@example.com>\r\n", None),
    (b"MAIL FROM:<" + b"x" * 600 + b"@example.org>\r\n", None),
]

raw_body = st.lists(
    st.one_of(
        st.sampled_from(
            [
                *(b"\n", b"\r", CRLF, b".", b"\x00", b"\xff", b"\n.\n", b"\r.\r", b"\n.\r\n"),
                *(b"\r\n.\n", b"\r\n..\r\n", b"MAIL FROM:<x@y.z>", b"QUIT", b"text " * 30),
            ]
        ),
        st.binary(max_size=30),
    ),
    max_size=30,
).map(b"".join)


def terminated(content: bytes) -> bytes:
    """``content`` made safe to send as one DATA body, then CRLF.CRLF.

    Every line start that is a dot is doubled, so only the final marker ends the body
    (the body starts after the DATA line's CRLF, so its first line counts too).
    """
    return (CRLF + content).replace(b"\r\n.", b"\r\n..")[2:] + b"\r\n.\r\n"


class SessionMachine(RuleBasedStateMachine):
    """A client sending valid and malformed units, an application answering at random.

    A *unit* is what earns exactly one final reply: a command or SASL line, a DATA body
    up to CRLF.CRLF, or a BDAT command with its chunk. Each unit is fed in random pieces.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conn = ServerConnection(ProtocolConfig())
        self.config = ProtocolConfig()
        self.rng = random.Random(0)
        self.errors = 0
        self.recipient_errors = 0
        self.collected = bytearray()
        self.ended: list[bytes] = []
        self.bdat_expected = bytearray()

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        config=st.builds(
            ProtocolConfig,
            bare_line_endings=st.sampled_from(BareLineEndings),
            max_message_size=st.sampled_from([0, 300, 5000]),
            max_errors=st.sampled_from([20, 10, 1]),
            max_recipient_errors=st.sampled_from([20, 1]),
            max_recipients=st.sampled_from([1, 3]),
            max_command_line=st.sampled_from([64, 512]),
            max_auth_line=st.sampled_from([256, 12288]),
            auth_enabled=st.booleans(),
            auth_required=st.booleans(),
            allow_insecure_auth=st.booleans(),
            tls_available=st.booleans(),
            chunking=st.booleans(),
            smtputf8=st.booleans(),
        ),
    )
    def connect(self, seed: int, config: ProtocolConfig) -> None:
        # A seeded Random, not st.randoms(): its draws would favour the rare branches.
        self.rng = random.Random(seed)
        self.config = config
        self._reconnect()

    # --- the application ---------------------------------------------------------------
    def _answer(self, decision: Decision) -> bool:
        """Answer at random; False when the application aborted instead."""
        roll = self.rng.random()
        if roll < 0.01:
            self.conn.abort(ABORT)
            return False
        if roll < 0.02:
            self.conn.reject(CLOSING_REJECTION)
            return True
        if roll < 0.7:
            self.conn.accept()
            if isinstance(decision, MessageEnd):
                self.recipient_errors = 0
        elif roll < 0.8:
            self.conn.accept(ACCEPT_REPLIES.get(type(decision), ACCEPT_REPLY))
            if isinstance(decision, MessageEnd):
                self.recipient_errors = 0
        else:
            codes = ANSWER_CODES[type(decision)].reject
            self.conn.reject(self.rng.choice([r for r in REJECTIONS if r.code in codes]))
            if isinstance(decision, RcptTo):
                self.recipient_errors += 1
        return True

    def _drain(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if event is PAUSED:
                conn.tls_started()  # the runtime's handshake succeeded; misuse would raise
                assert conn.state is State.CONNECTED and conn.tls_active
                continue
            assert isinstance(event, Event)
            match event:
                case ConnectionClosed():
                    return
                case MessageStart():
                    self.collected.clear()
                case MessageChunk(data=data):
                    assert conn.in_message
                    self.collected += data
                    limit = self.config.max_message_size
                    assert not limit or len(self.collected) <= limit
                case MessageEnd(size=size):
                    note_event("message ended")
                    assert size == len(self.collected)
                    self.ended.append(bytes(self.collected))
                case StartTLS():
                    assert self.config.tls_available and not conn.tls_active
                case AuthRequest():
                    assert self.config.auth_enabled and not conn.authenticated
                case MessageAborted(reply=reply):
                    note_event(f"message aborted: {reply.code}")
                case Hello() | MailFrom() | RcptTo():
                    pass
            if isinstance(event, Decision) and not self._answer(event):
                assert conn.next_event() == ConnectionClosed()
                return

    # --- sending units ------------------------------------------------------------------
    def _exchange(self, unit: bytes, cuts: Split, units: int = 1) -> list[str]:
        """Feed ``unit`` in pieces; check the replies against ``units`` complete units."""
        was_open = not self.conn.closed
        self.ended.clear()
        for piece in split_at(unit, cuts):
            self.conn.receive_data(piece)
            self._drain()
            self.buffers_stay_under_their_caps()
        finals = final_replies(self.conn.data_to_send())
        note_event(f"after a unit: {self.conn.state.value}")
        for line in finals:
            note_event(f"reply {line[:3]}")
        if not was_open:
            assert finals == [], "a closed connection answered"
            return finals
        self._check_count(finals, units)
        return finals

    def _check_count(self, finals: list[str], units: int) -> None:
        if self.conn.closed:
            # The session ended inside these units: QUIT (221), an application abort
            # (421 in place of an answer) or one error too many (421 4.7.0 after it).
            assert finals, "the connection closed without a word"
            last = finals[-1]
            assert last.startswith(("221 2.0.0", "421 4.3.2", "421 4.7.0")), finals
            too_many_errors = last.startswith("421 4.7.0")
            if too_many_errors:
                assert len(finals) >= 2 and is_error(finals[-2]), finals
            answered = len(finals) - 1 if too_many_errors else len(finals)
            assert answered <= units, (units, finals)
            if units == 1:
                assert answered == 1, finals
        else:
            assert len(finals) == units, (units, finals)
        # Every core error counts; one past max_errors the core says 421 and closes.
        for line in finals:
            if line.startswith("421"):
                if line.startswith(RECIPIENTS_421):
                    # Refused recipients are counted on their own, apart from errors.
                    assert self.recipient_errors == self.config.max_recipient_errors + 1
                    assert POLICY_MARK in finals[-2], finals
                elif line.startswith("421 4.7.0"):
                    assert self.errors == self.config.max_errors + 1, (self.errors, finals)
                break
            # 452 4.5.3 (recipients over the limit) is the protocol working, not an
            # error of the peer's, and is never counted (RFC 5321 §4.5.3.1.10).
            if is_error(line) and POLICY_MARK not in line and not line.startswith("452 4.5.3"):
                self.errors += 1
                assert self.errors <= self.config.max_errors + 1, finals
        assert self.conn.closed or self.errors <= self.config.max_errors

    def _send(self, unit: bytes, cuts: Split) -> list[str]:
        """Send a one-reply unit; inside DATA it is message content, so end it there."""
        if self.conn.state is State.DATA:
            unit = terminated(unit)
        return self._exchange(unit, cuts)

    @rule(
        bodies=st.lists(st.lists(body_line, max_size=20), min_size=1, max_size=6),
        cuts=unit_cuts,
    )
    def advance(self, bodies: list[list[bytes]], cuts: Split) -> None:
        """A few steps of a well-behaved session, from whatever the state is."""
        for lines in bodies:
            self._step(lines, cuts)

    def _step(self, lines: list[bytes], cuts: Split) -> None:
        conn, config = self.conn, self.config
        match conn.state:
            case State.DATA:
                self.send_body(lines, cuts)
                return
            case State.BDAT:
                self.send_bdat(b"".join(lines), True, cuts)
                return
            case State.CONNECTED:
                unit = b"EHLO client.example\r\n"
            case State.AUTH:
                unit = PLAIN_CREDENTIALS + CRLF
            case State.READY if config.auth_offered(tls_active=conn.tls_active) and not (
                conn.authenticated
            ):
                unit = b"AUTH PLAIN " + PLAIN_CREDENTIALS + CRLF
            case State.READY if config.tls_available and not conn.tls_active:
                unit = b"STARTTLS\r\n"
            case State.READY:
                unit = b"MAIL FROM:<s@example.org>\r\n"
            case State.MAIL:
                unit = b"RCPT TO:<r@example.com>\r\n"
            case State.RCPT if config.chunking and len(lines) % 2:  # BDAT half the time
                self.send_bdat(b"".join(lines), False, cuts)
                return
            case _:
                unit = b"DATA\r\n"
        self._exchange(unit, cuts)

    @rule(line=command_lines(), cuts=unit_cuts)
    def send_line(self, line: bytes, cuts: Split) -> None:
        self._send(line, cuts)

    @rule(
        prefix=st.sampled_from([b"NOOP ", b"AUTH PLAIN ", b"MAIL FROM:<", b""]),
        excess=st.one_of(st.integers(-3, 3), st.just(700)),
        ending=st.sampled_from(ENDINGS),
        cuts=unit_cuts,
    )
    def send_long_line(self, prefix: bytes, excess: int, ending: bytes, cuts: Split) -> None:
        """A line around its limit; past it, it is dropped and answered once (500)."""
        config, state = self.config, self.conn.state
        if state is State.AUTH:
            limit = config.max_auth_line
        elif prefix == b"AUTH PLAIN ":  # RFC 4954 §4: AUTH may be longer than 512
            limit = max(config.max_command_line, config.max_auth_line)
        elif prefix == b"MAIL FROM:<":  # the advertised extensions' allowances
            limit = config.mail_line_limit(tls_active=self.conn.tls_active)
        else:
            limit = config.max_command_line
        filler = max(0, limit + excess - len(prefix) - len(ending))
        line = prefix + b"A" * filler + ending
        finals = self._send(line, cuts)
        if finals and state is not State.DATA:
            too_long = "Line too long" if state is not State.AUTH else "line is too long"
            assert (too_long in finals[0]) is (len(line) > limit), (len(line), limit, finals)

    @rule(
        picks=st.lists(st.sampled_from(PIPELINE_LINES), min_size=2, max_size=8),
        cuts=unit_cuts,
    )
    def send_pipelined(self, picks: list[tuple[bytes, str | None]], cuts: Split) -> None:
        if self.conn.state is State.DATA:
            self._send(b"".join(line for line, _ in picks), cuts)
            return
        if self.conn.state is State.AUTH:  # the first line would be the SASL response
            picks = [(b"*\r\n", "501 5.0.0 Authentication cancelled"), *picks]
        finals = self._exchange(b"".join(line for line, _ in picks), cuts, units=len(picks))
        if not finals:
            return  # closed before the batch
        answered = len(finals) - 1 if self.conn.closed else len(finals)
        for (line, expected), got in zip(picks[:answered], finals[:answered], strict=True):
            if expected is not None:
                assert got == expected, (line, got, finals)

    @rule(
        chunk=st.one_of(
            st.binary(max_size=400),
            st.sampled_from([b"\r\n.\r\nQUIT\r\n", b"BDAT 1\r\n"]),
            st.integers(300, 6000).map(lambda n: b"y" * n),
        ),
        last=st.booleans(),
        cuts=unit_cuts,
    )
    def send_bdat(self, chunk: bytes, last: bool, cuts: Split) -> None:
        state = self.conn.state
        if state is State.RCPT:
            self.bdat_expected = bytearray(chunk)
        elif state is State.BDAT:
            self.bdat_expected += chunk
        line = b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"")
        if state is State.AUTH:
            self._exchange(line, cuts)  # a (bad) SASL response; no chunk follows
            return
        if state is State.DATA:
            self._send(line + chunk, cuts)  # message content
            return
        self._exchange(line + chunk, cuts)
        if self.ended:
            assert self.ended == [bytes(self.bdat_expected)]

    @precondition(lambda self: self.conn.state is State.DATA)
    @rule(lines=st.lists(body_line, max_size=20), cuts=unit_cuts)
    def send_body(self, lines: list[bytes], cuts: Split) -> None:
        self._exchange(stuffed(lines) + b".\r\n", cuts)
        if self.ended:
            assert self.ended == [b"".join(line + CRLF for line in lines)]

    @precondition(lambda self: self.conn.state is State.DATA)
    @rule(content=raw_body, cuts=unit_cuts)
    def send_raw_body(self, content: bytes, cuts: Split) -> None:
        finals = self._exchange(terminated(content), cuts)
        bare_lf = b"\n" in content.replace(CRLF, b"")
        if bare_lf and self.config.bare_line_endings is BareLineEndings.REJECT and finals:
            # Refused only after the real end; 552 if it was also too big first.
            assert finals[0].startswith(("550 5.5.2", "552 5.3.4")), finals

    @precondition(lambda self: self.conn.closed)
    @rule()
    def reconnect(self) -> None:
        """A closed session stays closed; the client opens a new one."""
        self.conn.receive_data(b"MAIL FROM:<late@example.org>\r\n")
        self._drain()
        assert self.conn.data_to_send() == b""
        self._reconnect()

    def _reconnect(self) -> None:
        self.conn = ServerConnection(self.config)
        self.errors = 0
        self.recipient_errors = 0
        assert final_replies(self.conn.data_to_send()) == [f"220 {self.config.hostname} ESMTP"]

    @rule(ending=st.sampled_from(["none", "none", "none", "none", "eof", "abort"]))
    def session_ends(self, ending: str) -> None:
        """Now and then the peer closes or the runtime aborts (421 on timeout)."""
        conn = self.conn
        if ending == "eof":
            conn.receive_data(b"")
            self._drain()
            assert final_replies(conn.data_to_send()) == []
            assert conn.closed
            self.closed_is_terminal()
            self._reconnect()  # nothing more can be fed to this one
        elif ending == "abort":
            was_open = not conn.closed
            conn.abort(TIMEOUT)
            finals = final_replies(conn.data_to_send())
            assert finals == ([TIMEOUT.render().decode().rstrip()] if was_open else [])
            assert conn.closed

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def buffers_stay_under_their_caps(self) -> None:
        conn = self.conn
        assert len(conn._buffer) <= line_cap(self.config)
        if conn._dot is not None:
            assert len(conn._dot._held) <= 5

    @invariant()
    def closed_is_terminal(self) -> None:
        conn = self.conn
        assert conn.state is not State.ERROR
        if conn.closed:
            assert conn.next_event() == ConnectionClosed()
            assert conn.next_event() == ConnectionClosed()
            assert conn.data_to_send() == b""
            assert not conn.in_message


SessionMachine.TestCase.settings = settings(
    max_examples=75,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSession = SessionMachine.TestCase
