"""A small SMTP server on asyncio streams, driving relate-smtp's sans-IO core.

It shows the core embeds in any event loop: this file has no Trio in it. It accepts any
AUTH, sender and recipient, and hands each message to a callback (by default, printing a
summary). There is no STARTTLS: the configuration does not offer it.

    python examples/asyncio_server.py --host 127.0.0.1 --port 2525

From code, ``await serve(host, port, on_message=messages.append)`` returns a started
``asyncio.Server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import Callable

import attrs

from relate_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    SHUTTING_DOWN,
    TIMEOUT,
    TLS_NOT_AVAILABLE,
    AuthRequest,
    ConnectionClosed,
    Hello,
    MailFrom,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    ProtocolConfig,
    Quit,
    RcptTo,
    Reset,
    ServerConnection,
    StartTLS,
    message_accepted,
)

#: RFC 5321 §4.5.3.2.7: the server should wait at least 5 minutes for the next command.
COMMAND_TIMEOUT = 300.0
READ_SIZE = 65536


@attrs.frozen(kw_only=True)
class ReceivedMessage:
    """One accepted message with its envelope."""

    queue_id: str
    helo: str | None
    username: str | None
    sender: str
    recipients: tuple[str, ...]
    data: bytes


OnMessage = Callable[[ReceivedMessage], None]

_queue_ids = itertools.count(1)


@attrs.define
class _Envelope:
    """What one session has collected for the transaction in progress."""

    username: str | None = None
    sender: str | None = None
    recipients: list[str] = attrs.field(factory=list)
    chunks: list[bytes] = attrs.field(factory=list)

    def reset(self) -> None:
        self.sender = None
        self.recipients.clear()
        self.chunks.clear()


async def _session(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: ProtocolConfig,
    on_message: OnMessage,
) -> None:
    """Drive one connection: read, feed the core, answer its decisions, write replies."""
    conn = ServerConnection(config)
    envelope = _Envelope()
    try:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                writer.write(conn.data_to_send())  # one write per pipelined batch
                await writer.drain()
                try:
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    conn.abort(TIMEOUT)
                    continue
                conn.receive_data(data)  # b"" at EOF
                continue
            if event is PAUSED:  # only after an accepted StartTLS, which is refused below
                conn.abort(TLS_NOT_AVAILABLE)
                continue
            match event:
                case Hello():
                    conn.accept()
                case RcptTo(address=address):
                    envelope.recipients.append(address)
                    conn.accept()
                case AuthRequest(username=username):
                    envelope.username = username  # any credentials will do here
                    conn.accept()
                case MailFrom(address=address):
                    envelope.reset()
                    envelope.sender = address
                    conn.accept()
                case StartTLS():
                    conn.reject(TLS_NOT_AVAILABLE)
                case MessageStart():
                    envelope.chunks.clear()
                case MessageChunk(data=data):
                    envelope.chunks.append(data)
                case MessageEnd():
                    queue_id = f"{next(_queue_ids):08X}"
                    on_message(
                        ReceivedMessage(
                            queue_id=queue_id,
                            helo=conn.hello_name,
                            username=envelope.username,
                            sender=envelope.sender or "",
                            recipients=tuple(envelope.recipients),
                            data=b"".join(envelope.chunks),
                        )
                    )
                    envelope.reset()
                    conn.accept(message_accepted(queue_id))
                case MessageAborted() | Reset():
                    envelope.reset()
                case Quit():
                    pass
                case ConnectionClosed():
                    writer.write(conn.data_to_send())
                    await writer.drain()
                    return
    except ConnectionError:
        pass  # the peer went away: nothing to say to it
    except asyncio.CancelledError:  # the server is shutting down
        conn.abort(SHUTTING_DOWN)
        writer.write(conn.data_to_send())
        raise
    finally:
        writer.close()


async def serve(
    host: str,
    port: int,
    *,
    on_message: OnMessage,
    config: ProtocolConfig | None = None,
) -> asyncio.Server:
    """Start listening on ``host``:``port`` (0 picks a free port) and return the server.

    By default AUTH is offered on plain text and required before MAIL, and every
    message goes to ``on_message``.
    """
    config = config or ProtocolConfig(hostname="asyncio.example", tls_available=False)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _session(reader, writer, config, on_message)

    return await asyncio.start_server(handle, host, port)


def _print_message(message: ReceivedMessage) -> None:
    print(
        f"{message.queue_id}: {message.sender or '<>'} -> {', '.join(message.recipients)}"
        f" ({len(message.data)} bytes, user {message.username})",
        flush=True,
    )


async def _serve_forever(host: str, port: int) -> None:
    server = await serve(host, port, on_message=_print_message)
    for sock in server.sockets:
        print(f"listening on {sock.getsockname()}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A minimal asyncio SMTP server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops it
        asyncio.run(_serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
