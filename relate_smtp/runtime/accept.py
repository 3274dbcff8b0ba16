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

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from relate_smtp.runtime.streams import PlainStream

__all__ = ["serve_socket", "set_connection_options"]

log = logging.getLogger("relate_smtp.server")

#: Called with the connection's stream and its peer's address as ``accept`` gave it
#: (which spares a ``getpeername`` per connection).
Handler = Callable[[PlainStream, tuple[Any, ...]], Awaitable[object]]

# As trio.serve_listeners: out of descriptors or memory, wait and try again.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_CAPACITY_PAUSE = 0.1
# Linux's TCP_NOTSENT_LOWAT (socket lacks the name before Python 3.12), and trio's value.
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_NOTSENT_LOWAT = 16 * 1024
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
    set_connection_options(listening)
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
            stream = PlainStream(connection)
            handler_nursery.start_soon(_handle, handler, stream, peer)
            # A yield per connection, as serve_listeners: sessions started in a burst
            # buffer their messages at the same moment (taking 32 connections per turn
            # raised the peak RSS of 100 concurrent 1 MiB messages from ~105 to ~150 MiB).
            await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(listening)
        listening.close()


def set_connection_options(listening: socket.socket) -> None:
    """The options ``trio.SocketStream`` sets on each connection, set once here: Linux
    copies them to every accepted socket. TCP_NODELAY: a reply must not wait for the
    ACK of the one before (Nagle). TCP_NOTSENT_LOWAT: at most 16 KiB of unsent replies
    are queued in the kernel, so a client that reads nothing blocks our writes (and
    meets the command clock) instead of filling megabytes of socket buffer. Set when
    the socket is bound (connections the kernel queues before ``serve_socket`` starts
    get them too) and again here, for sockets bound elsewhere."""
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):  # older kernels lack it
        listening.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)


async def _handle(handler: Handler, stream: PlainStream, peer: tuple[Any, ...]) -> None:
    try:
        await handler(stream, peer)
    finally:
        stream.close()
