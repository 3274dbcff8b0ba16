"""ServerConnection: the SMTP server state machine, fed bytes and answers.

It owns the receive buffer, dispatches each command line, holds the one pending
`Decision`, and collects outbound bytes. Sequencing comes from `_state.TRANSITIONS`,
grammar from `_commands`, wording from `_replies`, and what each command line does
from `_dispatch`; every `_Reject` raised by those is caught in `_advance` and nowhere
else.
"""

from __future__ import annotations

import functools
from typing import Final

import attrs

from . import _replies as replies
from ._buffer import Line, ReceiveBuffer
from ._commands import split_command
from ._config import BareLineEndings, ProtocolConfig
from ._data import Chunk, DotReader, Outcome
from ._dispatch import HANDLERS
from ._errors import LocalProtocolError
from ._events import (
    ANSWER_CODES,
    NEED_DATA,
    PAUSED,
    AnyDecision,
    AnyEvent,
    AuthRequest,
    BodyType,
    ConnectionClosed,
    Decision,
    Hello,
    MailFrom,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    Pending,
    RcptTo,
    Reset,
    StartTLS,
)
from ._replies import Reply, _Reject
from ._sasl import Credentials, SaslExchange
from ._state import MESSAGE_STATES, TRANSITIONS, Command, State, out_of_sequence

_AUTH_PREFIX: Final = b"AUTH "
_MAIL_PREFIX: Final = b"MAIL "


@functools.lru_cache(maxsize=64)
def _longer_line_limits(config: ProtocolConfig, tls_active: bool) -> tuple[tuple[bytes, int], ...]:
    """Per config and TLS state (cached: asked by every new connection)."""
    return (
        (_AUTH_PREFIX, config.max_auth_line),  # RFC 4954 §4
        (_MAIL_PREFIX, config.mail_line_limit(tls_active=tls_active)),
    )


@attrs.define
class _Transaction:
    """What the core itself must remember about the current mail transaction."""

    smtputf8: bool
    body: BodyType | None
    recipients: int = 0
    #: Octets received so far in BDAT chunks.
    chunked_size: int = 0


class ServerConnection:
    """One SMTP server session, without I/O (after h11's ``Connection``).

    Feed bytes with `receive_data`, pull events with `next_event`, answer each
    `Decision` with `accept` or `reject`, and write out `data_to_send`. The greeting
    is queued at construction. Bad input from the peer never raises: the core queues
    the reply. `LocalProtocolError` means the application misused the API.
    """

    def __init__(self, config: ProtocolConfig) -> None:
        self._config = config
        self._normalize = config.bare_line_endings is BareLineEndings.NORMALIZE
        self._state = State.CONNECTED
        self._tls_active = config.tls_active
        self._authenticated = False
        self._hello_name: str | None = None
        self._buffer = ReceiveBuffer()
        self._eof = False
        self._out: list[bytes] = [replies.greeting(config.hostname).render()]
        # A list, not a deque: it rarely holds more than two events, and an idle
        # connection should not carry a deque's 600-byte block.
        self._events: list[AnyEvent] = []
        self._pending: Decision | None = None
        self._target = State.CONNECTED  # where accepting the pending decision leads
        self._errors = 0
        self._recipient_errors = 0
        self._longer_lines = self._longer_line_limits()
        self._transaction: _Transaction | None = None
        self._sasl: SaslExchange | None = None
        self._dot: DotReader | None = None
        self._chunk: Chunk | None = None

    # --- read-only views -------------------------------------------------------------
    @property
    def state(self) -> State:
        """Where the session is; the runtime picks its timeout from this."""
        return self._state

    @property
    def authenticated(self) -> bool:
        """Whether an AUTH exchange succeeded on the current channel."""
        return self._authenticated

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def in_message(self) -> bool:
        """True from MessageStart until the message is answered, aborted or reset."""
        return self._state in MESSAGE_STATES

    @property
    def hello_name(self) -> str | None:
        """The domain from the accepted EHLO/HELO, forgotten after STARTTLS."""
        return self._hello_name

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    # --- the sans-IO API -------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._state is State.ERROR:
            self._check_usable()
        if not data:
            self._eof = True
            return
        if self._eof:
            raise self._misuse("receive_data() after end of input (b'')")
        if self._state is State.CLOSED or self._state is State.TLS_HANDSHAKE:
            return  # nothing more is read; before the handshake it would be injection
        self._buffer.append(data)

    def next_event(self) -> AnyEvent | Pending:
        """The next event, or NEED_DATA / PAUSED when there is none yet."""
        if self._state is State.ERROR:
            self._check_usable()
        if self._pending is not None:
            raise self._misuse("answer the pending decision before asking for another event")
        try:
            while not self._events:
                if not self._advance():
                    return self._idle()
            event = self._events.pop(0)
        except BaseException:
            self._state = State.ERROR
            raise
        if isinstance(event, Decision):
            self._pending = event
        return event

    def accept(self, reply: Reply | None = None) -> None:
        """Accept the pending decision, with its standard reply or one of your own.

        Your reply's code must be one the decision can take (`_events.ANSWER_CODES`).
        """
        decision = self._answer(reply, accepting=True)
        target = self._target
        match decision:
            case Hello(extended=extended, domain=domain):
                if reply is None:
                    reply = (
                        replies.ehlo_reply(self._config, tls_active=self._tls_active)
                        if extended
                        else replies.helo_reply(self._config.hostname)
                    )
                self._hello_name = domain
                if self._transaction is not None:
                    # RFC 5321 §4.1.4: an acceptable EHLO/HELO resets the transaction.
                    self._reset_transaction()
            case AuthRequest():
                reply = reply or replies.AUTH_SUCCEEDED
                self._authenticated = True
            case MailFrom(smtputf8=smtputf8, body=body):
                reply = reply or replies.SENDER_OK
                self._transaction = _Transaction(smtputf8=smtputf8, body=body)
            case RcptTo():
                reply = reply or replies.RECIPIENT_OK
                assert self._transaction is not None
                self._transaction.recipients += 1
            case StartTLS():
                reply = reply or replies.READY_FOR_TLS
                # RFC 3207 §4.2 and CVE-2011-0411: what the client pipelined behind
                # STARTTLS was sent in clear and must not be run after the handshake.
                self._buffer.clear()
            case MessageEnd():
                reply = reply or replies.OK
                self._transaction = None
                self._recipient_errors = 0  # Postfix: errors "without delivering mail"
            case _:
                raise AssertionError(f"unknown decision {decision!r}")
        self._state = target
        self._out.append(reply.render())

    def reject(self, reply: Reply) -> None:
        """Refuse the pending decision with a 4xx/5xx reply; a 421 also closes."""
        decision = self._answer(reply, accepting=False)
        if isinstance(decision, MessageEnd):
            self._transaction = None
            self._state = self._target
        elif isinstance(decision, AuthRequest):
            self._state = self._target
        self._out.append(reply.render())
        if reply.code == 421:
            self._close()  # RFC 5321 §3.8: 421 means the server closes the channel
        elif isinstance(decision, RcptTo):
            self._count_recipient_error()

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call (replies batched)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The runtime finished the TLS handshake after an accepted StartTLS.

        The session starts over: EHLO, AUTH and any transaction are forgotten
        (RFC 3207 §4.2).
        """
        self._check_usable()
        if self._state is not State.TLS_HANDSHAKE:
            raise self._misuse("tls_started() without an accepted StartTLS")
        self._tls_active = True
        self._longer_lines = self._longer_line_limits()
        self._authenticated = False
        self._hello_name = None
        self._transaction = None
        self._state = TRANSITIONS[State.TLS_HANDSHAKE, Command.TLS_DONE]

    def abort(self, reply: Reply) -> None:
        """Queue ``reply`` (e.g. 421 on timeout or shutdown) and close the session.

        Any pending decision is dropped. On a closed connection it does nothing.
        """
        if self._state is State.CLOSED:
            return
        self._out.append(reply.render())
        self._pending = None
        self._events.clear()
        if self._state is not State.ERROR:
            self._close()

    # --- driving the machine ---------------------------------------------------------
    def _advance(self) -> bool:
        """Consume some input; False when nothing more can be done without more."""
        state = self._state
        if state is State.CLOSED or state is State.TLS_HANDSHAKE:
            return False
        if self._chunk is not None:
            return self._read_chunk()
        if self._dot is not None:
            return self._read_dot()
        if state is State.AUTH:
            line = self._buffer.next_line(self._config.max_auth_line)
        else:
            line = self._buffer.next_line(self._config.max_command_line, self._longer_lines)
        if line is Line.INCOMPLETE:
            return False
        try:
            if line is Line.TOO_LONG:
                raise _Reject(
                    replies.AUTH_LINE_TOO_LONG if state is State.AUTH else replies.LINE_TOO_LONG
                )
            self._on_line(line)
        except _Reject as rejection:
            if self._state is State.AUTH:  # any error ends the SASL exchange
                self._sasl = None
                self._state = TRANSITIONS[State.AUTH, Command.AUTH_DONE]
            if rejection.counted:
                self._error(rejection.reply)
            else:
                self._out.append(rejection.reply.render())
        return True

    def _idle(self) -> Pending | ConnectionClosed:
        if self._eof and self._state is not State.CLOSED:
            self._close()  # a partial command or message is abandoned
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if self._state is State.TLS_HANDSHAKE:
            return PAUSED
        return NEED_DATA

    def _on_line(self, line: bytes) -> None:
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif self._normalize:
            line = line[:-1]
        else:
            raise _Reject(replies.BARE_LF_IN_COMMAND)
        if self._state is State.AUTH:
            exchange = self._sasl
            assert exchange is not None
            self._sasl = None
            self._sasl_step(exchange, exchange.respond(line))
            return
        command, args = split_command(line)
        if command is None:
            raise _Reject(replies.UNKNOWN_COMMAND)
        HANDLERS[command](self, command, args, TRANSITIONS.get((self._state, command)))

    def _decide(self, decision: AnyDecision, target: State) -> None:
        self._events.append(decision)
        self._target = target

    def _error(self, reply: Reply) -> None:
        """Answer a peer error and count it; past max_errors say 421 and close."""
        self._out.append(reply.render())
        self._errors += 1
        if self._errors > self._config.max_errors:
            self._out.append(replies.TOO_MANY_ERRORS.render())
            self._close()

    def _count_recipient_error(self) -> None:
        """Count a refused recipient; past max_recipient_errors say 421 and close.

        Apart from ``_errors``: a refused recipient is the application's answer, not a
        broken client (see ``ProtocolConfig``). The core's own 452 for too many
        recipients is not counted (RFC 5321 §4.5.3.1.10).
        """
        self._recipient_errors += 1
        if self._recipient_errors > self._config.max_recipient_errors:
            self._out.append(replies.TOO_MANY_RECIPIENT_ERRORS.render())
            self._close()

    def _longer_line_limits(self) -> tuple[tuple[bytes, int], ...]:
        """Commands allowed past the command line limit, with their own limits."""
        return _longer_line_limits(self._config, self._tls_active)

    def _close(self) -> None:
        self._state = State.CLOSED
        self._buffer.clear()
        self._transaction = None
        self._sasl = None
        self._dot = None
        self._chunk = None

    def _check_usable(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError("the connection is in the ERROR state")

    def _misuse(self, message: str) -> LocalProtocolError:
        self._state = State.ERROR
        return LocalProtocolError(message)

    def _answer(self, reply: Reply | None, *, accepting: bool) -> Decision:
        if self._state is State.ERROR:
            self._check_usable()
        decision = self._pending
        if decision is None:
            raise self._misuse("no decision is pending")
        if reply is not None:
            if not isinstance(reply, Reply):
                raise self._misuse(f"expected a Reply, got {reply!r}")
            codes = ANSWER_CODES[type(decision)]
            if reply.code not in (codes.accept if accepting else codes.reject):
                verb = "accept" if accepting else "reject"
                name = type(decision).__name__
                raise self._misuse(f"{verb}() cannot answer {name} with {reply.code}")
        self._pending = None
        return decision

    def _require(self, target: State | None, command: Command) -> State:
        if target is None:
            raise _Reject(out_of_sequence(self._state, command))
        return target

    def _tx(self) -> _Transaction:
        transaction = self._transaction
        assert transaction is not None, "the table only allows this inside a transaction"
        return transaction

    def _reset_transaction(self) -> None:
        self._transaction = None
        self._events.append(Reset())

    # --- message bodies --------------------------------------------------------------
    def _read_dot(self) -> bool:
        reader = self._dot
        assert reader is not None
        if not len(self._buffer):
            return False
        data, rest = reader.feed(self._buffer.take_all())
        if data:
            self._events.append(MessageChunk(data=data))
        if rest is None:
            return True
        self._dot = None
        if rest:
            self._buffer.put_back(rest)
        if reader.outcome is Outcome.COMPLETE:
            self._decide(
                MessageEnd(size=reader.size), TRANSITIONS[State.DATA, Command.MESSAGE_DONE]
            )
        elif reader.outcome is Outcome.TOO_BIG:
            self._abort_message(replies.MESSAGE_TOO_BIG)
        else:
            self._abort_message(replies.BARE_LF_IN_DATA)
        return True

    def _read_chunk(self) -> bool:
        chunk = self._chunk
        assert chunk is not None
        if chunk.remaining:
            if not len(self._buffer):
                return False
            data = self._buffer.take(chunk.remaining)
            chunk.remaining -= len(data)
            if chunk.refusal is None:
                self._events.append(MessageChunk(data=data))
            if chunk.remaining:
                return True
        self._chunk = None
        if chunk.refusal is not None:
            if self._state is State.BDAT:
                self._abort_message(chunk.refusal)
            else:
                self._error(chunk.refusal)
        elif chunk.last:
            size = self._tx().chunked_size
            self._decide(MessageEnd(size=size), TRANSITIONS[State.BDAT, Command.MESSAGE_DONE])
        else:
            self._out.append(replies.bdat_received(chunk.size).render())
        return True

    def _abort_message(self, reply: Reply) -> None:
        self._events.append(MessageAborted(reply=reply))
        self._transaction = None
        self._state = TRANSITIONS[self._state, Command.MESSAGE_DONE]
        self._error(reply)

    def _start_chunk(self, chunk: Chunk) -> None:
        self._chunk = chunk
        if not chunk.size:
            self._read_chunk()

    # --- SASL ------------------------------------------------------------------------
    def _sasl_step(self, exchange: SaslExchange, step: Reply | Credentials) -> None:
        if isinstance(step, Reply):  # a 334 challenge: the next line is the response
            self._sasl = exchange
            self._out.append(step.render())
            return
        request = AuthRequest(
            mechanism=step.mechanism,
            authorization_id=step.authorization_id,
            username=step.username,
            password=step.password,
        )
        self._decide(request, TRANSITIONS[State.AUTH, Command.AUTH_DONE])
