"""Accepting connections: a task per connection and no scheduler work beyond it.

``trio.serve_listeners`` closes each stream after its handler inside a cancelled scope,
which raises and catches an exception per connection, and accepts through the layers of
``SocketListener`` and the Trio socket. At one message per connection both show in the
CPU per message. Here the listening socket is accepted on directly, waiting only when
its backlog is empty, and the connection's socket is closed without an await.
Otherwise it behaves as ``serve_listeners``: one yield per connection accepted,
resource errors pause accepting, a handler's exception goes to the handler nursery, and
the listening socket is closed when serving is cancelled.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["serve_socket"]

log = logging.getLogger("relate_smtp.server")

#: Called with the connection's stream and its peer's address as ``accept`` gave it
#: (which spares a ``getpeername`` per connection).
Handler = Callable[[trio.SocketStream, tuple[Any, ...]], Awaitable[object]]

# As trio.serve_listeners: out of descriptors or memory, wait and try again.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_CAPACITY_PAUSE = 0.1
# A connection reset or refused before it was accepted is not the listener's failure.
_IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPERM", "EPROTO", "ENOPROTOOPT")
    if hasattr(errno, name)
)


async def serve_socket(
    listening: socket.socket, handler: Handler, handler_nursery: trio.Nursery
) -> None:
    """Accept on ``listening`` until cancelled, each connection handled in its own task
    in ``handler_nursery``; the listening socket is closed on the way out."""
    listening.setblocking(False)
    try:
        while True:
            try:
                connection, peer = listening.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listening)
                continue
            except OSError as exc:
                if exc.errno in _IGNORED_ERRNOS:
                    continue
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.error(
                    "accept returned %s (%s); retrying in %s seconds",
                    errno.errorcode[exc.errno],
                    os.strerror(exc.errno),
                    _CAPACITY_PAUSE,
                )
                await trio.sleep(_CAPACITY_PAUSE)
                continue
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(connection))
            handler_nursery.start_soon(_handle, handler, stream, peer)
            # A yield per connection, as serve_listeners: sessions started in a burst
            # buffer their messages at the same moment (taking 32 connections per turn
            # raised the peak RSS of 100 concurrent 1 MiB messages from ~105 to ~150 MiB).
            await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(listening)
        listening.close()


async def _handle(handler: Handler, stream: trio.SocketStream, peer: tuple[Any, ...]) -> None:
    try:
        await handler(stream, peer)
    finally:
        stream.socket.close()
