"""What each command line does: one function per SMTP verb, looked up in `HANDLERS`.

A handler gets the connection, the command, its raw arguments and where the state
table (`_state.TRANSITIONS`) says the command leads from the current state (None: out
of sequence). It parses the arguments with `_commands`, raises `_Reject` for a bad
one (caught in `ServerConnection._advance`), and either queues the core's own reply
or hands the application a `Decision`. Sequencing is not decided here: a handler only
checks the table's answer with `ServerConnection._require`.

These functions are the connection's own steps, split out of `_connection.py` to keep
each module to one job; they reach into its private state and nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from . import _replies as replies
from ._commands import parse_auth, parse_bdat, parse_hello, parse_mail, parse_rcpt
from ._data import Chunk, DotReader
from ._events import BodyType, Hello, MessageStart, Quit, StartTLS
from ._replies import _Reject
from ._sasl import start_exchange
from ._state import Command, State, out_of_sequence

if TYPE_CHECKING:
    from ._connection import ServerConnection


def _on_hello(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    target = conn._require(target, command)
    domain = parse_hello(_text(args), command)
    conn._decide(Hello(extended=command is Command.EHLO, domain=domain), target)


def _on_auth(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    config = conn._config
    if not config.auth_enabled:
        raise _Reject(replies.NOT_IMPLEMENTED)
    target = conn._require(target, command)
    if conn._authenticated:
        raise _Reject(replies.ALREADY_AUTHENTICATED)
    if not config.auth_offered(tls_active=conn._tls_active):
        raise _Reject(replies.ENCRYPTION_REQUIRED)  # RFC 4954 §6
    mechanism, initial = parse_auth(_text(args))
    exchange = start_exchange(mechanism)
    conn._state = target
    conn._sasl_step(exchange, exchange.start(None if initial is None else initial.encode()))


def _on_starttls(
    conn: ServerConnection, command: Command, args: bytes, target: State | None
) -> None:
    if not conn._config.tls_available:
        raise _Reject(replies.NOT_IMPLEMENTED)
    if conn._tls_active:
        raise _Reject(replies.TLS_ALREADY_ACTIVE)
    target = conn._require(target, command)
    if args:
        raise _Reject(replies.SYNTAX_NO_PARAMETERS)  # RFC 3207 §4
    conn._decide(StartTLS(), target)


def _on_mail(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    target = conn._require(target, command)
    config = conn._config
    if config.auth_enabled and config.auth_required and not conn._authenticated:
        raise _Reject(replies.AUTH_REQUIRED)  # RFC 4954 §6
    conn._decide(parse_mail(_text(args), config), target)


def _on_rcpt(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    target = conn._require(target, command)
    transaction = conn._tx()
    event = parse_rcpt(_text(args), smtputf8=transaction.smtputf8)
    if transaction.recipients >= conn._config.max_recipients:
        # RFC 5321 §4.5.3.1.10: the client is expected to go on with the recipients
        # accepted so far, so this is not an error that counts toward 421.
        raise _Reject(replies.TOO_MANY_RECIPIENTS, counted=False)
    conn._decide(event, target)


def _on_data(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    target = conn._require(target, command)
    if args:
        raise _Reject(replies.SYNTAX_NO_PARAMETERS)
    if conn._tx().body is BodyType.BINARY_MIME:
        raise _Reject(replies.BINARYMIME_NEEDS_BDAT)  # RFC 3030 §3
    conn._out.append(replies.START_MAIL_INPUT.render())
    conn._state = target
    conn._dot = DotReader(max_size=conn._config.max_message_size, normalize_bare_lf=conn._normalize)
    conn._events.append(MessageStart(chunked=False))


def _on_bdat(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    size, last = parse_bdat(args)  # without a size nothing can be skipped: just 501
    # From here on the chunk is always consumed, even when refused (RFC 3030 §2).
    if not conn._config.chunking:
        conn._start_chunk(Chunk(size, last, replies.NOT_IMPLEMENTED))
        return
    if target is None:
        conn._start_chunk(Chunk(size, last, out_of_sequence(conn._state, command)))
        return
    transaction = conn._tx()
    if conn._state is not State.BDAT:
        conn._state = target
        conn._events.append(MessageStart(chunked=True))
    transaction.chunked_size += size
    limit = conn._config.max_message_size
    too_big = limit and transaction.chunked_size > limit
    conn._start_chunk(Chunk(size, last, replies.MESSAGE_TOO_BIG if too_big else None))


def _on_rset(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    target = conn._require(target, command)
    if args:
        raise _Reject(replies.SYNTAX_NO_PARAMETERS)
    conn._reset_transaction()
    conn._state = target
    conn._out.append(replies.OK.render())


def _on_noop(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    # RFC 5321 §4.1.1.9: any argument is ignored.
    conn._state = conn._require(target, command)
    conn._out.append(replies.OK.render())


def _on_vrfy(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    conn._state = conn._require(target, command)
    if not args:
        raise _Reject(replies.SYNTAX_VRFY)
    conn._out.append(replies.CANNOT_VRFY.render())  # RFC 5321 §3.5.3


def _on_help(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    conn._state = conn._require(target, command)
    conn._out.append(replies.HELP.render())


def _on_quit(conn: ServerConnection, command: Command, args: bytes, target: State | None) -> None:
    conn._require(target, command)
    if args:
        raise _Reject(replies.SYNTAX_NO_PARAMETERS)
    conn._out.append(replies.CLOSING.render())
    conn._events.append(Quit())
    conn._close()


def _text(args: bytes) -> str:
    try:
        return args.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(replies.INVALID_UTF8) from None


HANDLERS: Final[
    Mapping[Command, Callable[[ServerConnection, Command, bytes, State | None], None]]
] = {
    Command.HELO: _on_hello,
    Command.EHLO: _on_hello,
    Command.AUTH: _on_auth,
    Command.STARTTLS: _on_starttls,
    Command.MAIL: _on_mail,
    Command.RCPT: _on_rcpt,
    Command.DATA: _on_data,
    Command.BDAT: _on_bdat,
    Command.RSET: _on_rset,
    Command.NOOP: _on_noop,
    Command.VRFY: _on_vrfy,
    Command.HELP: _on_help,
    Command.QUIT: _on_quit,
}
