"""The accept loop: each connection a PlainStream with the peer's address and the
socket options trio.SocketStream would have set."""

from __future__ import annotations

import socket
from typing import Any

import trio
import trio.testing

from relate_smtp.listener_kind import ListenerKind
from relate_smtp.runtime.accept import serve_socket
from relate_smtp.runtime.listeners import bind_socket
from relate_smtp.runtime.streams import PlainStream


async def test_connections_arrive_with_their_address_and_socket_options() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    seen: list[tuple[int, int, tuple[Any, ...], bytes]] = []
    done = trio.Event()

    async def handler(stream: PlainStream, peer: tuple[Any, ...]) -> None:
        sock = stream.socket
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        lowat = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25))
        seen.append((nodelay, lowat, peer, await stream.receive_some()))
        done.set()

    async with trio.open_nursery() as handlers, trio.open_nursery() as accepting:
        accepting.start_soon(serve_socket, listening, handler, handlers)
        await trio.testing.wait_all_tasks_blocked()  # the options are set
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", port))
        await client.send(b"EHLO x\r\n")
        await done.wait()
        accepting.cancel_scope.cancel()
    ((nodelay, lowat, peer, data),) = seen
    assert nodelay == 1 and lowat == 16 * 1024
    assert peer == client.getsockname()
    assert data == b"EHLO x\r\n"
    assert listening.fileno() == -1  # closed when serving is cancelled
    client.close()


def test_listening_sockets_carry_the_options_from_the_start() -> None:
    """Connections the kernel queues before the accept loop starts get them too."""
    listening = bind_socket(ListenerKind.SUBMISSION, 0)
    with listening, socket.create_connection(("127.0.0.1", listening.getsockname()[1])):
        accepted, _ = listening.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            lowat = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
            assert accepted.getsockopt(socket.IPPROTO_TCP, lowat) == 16 * 1024
