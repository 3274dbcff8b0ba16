"""Streams for the session: accepted TCP connections, replaying bytes that were read
ahead, and closing without losing the final reply."""

from __future__ import annotations

import errno
import os
import socket

import trio

# How long and how much input a closing session drops after its final reply (linger).
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024
_LINGER_READ = 64 * 1024


_DEFAULT_RECEIVE = 64 * 1024


class PlainStream(trio.abc.HalfCloseableStream):
    """An accepted TCP connection, read and written through its descriptor.

    ``trio.SocketStream`` wraps a Trio socket object in conflict detectors and sets two
    socket options per connection; at one message per connection both show in the CPU
    per message. Sessions need none of it: each stream has one task, and the listening
    socket carries the options (``accept.set_connection_options``), which Linux copies
    to every accepted socket. Errors and checkpoints are ``SocketStream``'s.
    """

    __slots__ = ("_shut", "fd", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.fd = sock.fileno()
        self._shut = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.fd < 0:
            raise trio.ClosedResourceError("this stream was already closed")
        return await receive_plain(self.fd, max_bytes or _DEFAULT_RECEIVE)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.fd < 0:
            raise trio.ClosedResourceError("this stream was already closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass  # waited for outside the handler, which would keep the exception
            except OSError as exc:
                raise _stream_error(exc) from exc
            await trio.lowlevel.wait_writable(self.fd)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.fd)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.fd < 0:
            raise trio.ClosedResourceError("this stream was already closed")
        if self._shut:
            return
        self._shut = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from exc

    def close(self) -> None:
        """Close at once (no await): wake any waiter, then close the descriptor."""
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            self.fd = -1
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first returns ``prefix`` and then reads from ``inner``.

    Bytes that arrive in the same read as a PROXY header belong to what follows it
    (SMTP commands, or a TLS ClientHello on an implicit-TLS listener), so they are
    handed back before the socket is read again.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Half-close when the inner stream can (a TCP socket), else close it whole."""
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()
        else:
            await self._inner.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def linger(stream: trio.abc.Stream, *, after_quit: bool = False) -> None:
    """Shut our write side, then read and drop input briefly before the close.

    A peer still sending (pipelined commands past a 421 for too many errors, or into a
    shutdown or a timeout) would otherwise meet a close with unread input, which the
    kernel answers with a reset that can discard the final reply before the peer reads
    it. The FIN after the reply lets it read the reply and stop; the drain is bounded in
    time and bytes, so a peer that never stops costs at most that (a lingering close,
    as web servers do). Under TLS the TCP stream is shut directly: the reply is already
    out, and SMTP's own framing makes a missing close_notify harmless. ``after_quit``
    (the 221 to QUIT was the last reply): on a plain socket with no input waiting, the
    close follows at once, since the peer has nothing more to send.
    """
    transport = stream.transport_stream if type(stream) is trio.SSLStream else stream
    if type(transport) is not PlainStream and not isinstance(
        transport, trio.abc.HalfCloseableStream
    ):
        return
    if after_quit and isinstance(transport, PlainStream):
        # RFC 5321 §4.1.1.10: after QUIT the peer sends nothing more. When nothing
        # arrived, the close sends a FIN, not a reset: no need to wait for the peer's.
        try:
            if not os.read(transport.fd, _LINGER_READ):
                return
        except OSError:  # BlockingIOError: nothing arrived; others: the peer is gone
            return
    with trio.move_on_after(_LINGER_SECONDS):
        try:
            await transport.send_eof()
            drained = 0
            while drained < _LINGER_BYTES:
                data = await transport.receive_some(_LINGER_READ)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def receive_plain(
    fd: int, max_bytes: int, *, replied: bool = False, others: bool = True
) -> bytes:
    """``SocketStream.receive_some`` on a plain TCP socket's descriptor, with its
    checkpoints and errors, without its layers of context managers (a read per command).

    ``replied``: a reply was just written, so the peer's answer cannot be here yet.
    With ``others`` (other sessions are open) the task yields first and reads after
    their turns: under load the answer has arrived by then, and the read needs no wait
    on the descriptor (an ``epoll_ctl`` and a round trip through the I/O manager per
    command otherwise). A session alone waits at once: nothing would run meanwhile,
    and the read could only fail.
    """
    if replied:
        if not others:
            return await _wait_and_read(fd, max_bytes)
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = os.read(fd, max_bytes)
    except BlockingIOError:
        pass  # waited for below, outside the handler: an idle session keeps no exception
    except OSError as exc:
        raise _stream_error(exc) from exc
    else:
        if not replied:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data
    return await _wait_and_read(fd, max_bytes)


async def _wait_and_read(fd: int, max_bytes: int) -> bytes:
    """Wait until the descriptor is readable, then read (again after a spurious
    wake-up)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def close_now(stream: trio.abc.Stream) -> None:
    """Close at once, even inside a cancelled scope; a plain socket needs no await."""
    if isinstance(stream, PlainStream):
        stream.close()
    elif isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def describe_error(exc: BaseException) -> str:
    """The innermost cause of a transport error, as one short phrase."""
    cause = exc.__cause__ or exc.__context__
    return str(cause or exc) or type(exc).__name__
