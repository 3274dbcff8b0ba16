"""Stream helpers: bytes read ahead replayed first, the lingering close, closing at once."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from relate_smtp.runtime import streams
from relate_smtp.runtime.streams import PrefixedStream, close_now, describe_error, linger


class WholeStream(trio.abc.Stream):
    """A stream that cannot half-close (like an SSLStream): only a whole close."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


# ---------------------------------------------------------------------------- PrefixedStream


async def test_the_prefix_comes_before_the_inner_stream() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    stream = PrefixedStream(ours, b"EHLO client\r\n")
    await peer.send_all(b"QUIT\r\n")
    assert await stream.receive_some() == b"EHLO client\r\n"
    assert await stream.receive_some() == b"QUIT\r\n"


async def test_a_short_read_takes_the_prefix_in_pieces() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    stream = PrefixedStream(ours, b"abcdef")
    await peer.send_all(b"gh")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some(4) == b"ef"
    assert await stream.receive_some(4) == b"gh"


async def test_an_empty_prefix_reads_the_inner_stream() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    stream = PrefixedStream(ours, b"")
    await peer.send_all(b"data")
    assert await stream.receive_some() == b"data"


async def test_sends_and_close_go_to_the_inner_stream() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    stream = PrefixedStream(ours, b"ahead")
    await stream.wait_send_all_might_not_block()
    await stream.send_all(b"220 ready\r\n")
    assert await peer.receive_some() == b"220 ready\r\n"
    await stream.aclose()
    assert await peer.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"more")


async def test_send_eof_half_closes_a_half_closeable_stream() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    stream = PrefixedStream(ours, b"")
    await stream.send_eof()
    assert await peer.receive_some() == b""
    await peer.send_all(b"still talking")  # our read side stays open
    assert await stream.receive_some() == b"still talking"


async def test_send_eof_closes_a_stream_that_cannot_half_close() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    whole = WholeStream(ours)
    await PrefixedStream(whole, b"").send_eof()
    assert whole.closed
    assert await peer.receive_some() == b""


# ---------------------------------------------------------------------------- linger


async def test_linger_sends_eof_and_returns_when_the_peer_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = trio.testing.memory_stream_pair()
    await peer.send_all(b"RCPT TO:<late@example.com>\r\n")  # pipelined past our 421
    await peer.send_eof()
    start = trio.current_time()
    await linger(ours)
    assert trio.current_time() == start  # no wait: the peer had finished
    assert await peer.receive_some() == b""  # it saw our FIN


async def test_linger_gives_a_silent_peer_its_time_and_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await linger(ours)
    assert trio.current_time() - start == pytest.approx(streams._LINGER_SECONDS)
    assert await peer.receive_some() == b""


async def test_linger_drops_a_bounded_amount_from_a_peer_that_keeps_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = trio.testing.memory_stream_pair()
    flood = b"x" * (4 * streams._LINGER_BYTES)
    await peer.send_all(flood)
    start = trio.current_time()
    await linger(ours)
    assert trio.current_time() == start  # stopped on the byte bound, not the clock
    left = 0
    with trio.move_on_after(0.1):
        while data := await ours.receive_some():
            left += len(data)
    assert 0 < left < len(flood)


async def test_linger_leaves_a_stream_that_cannot_half_close_alone() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    whole = WholeStream(ours)
    await linger(whole)
    assert not whole.closed
    await whole.send_all(b"still open")
    assert await peer.receive_some() == b"still open"


async def test_linger_on_a_closed_stream_returns_quietly() -> None:
    ours, _peer = trio.testing.memory_stream_pair()
    await ours.aclose()
    with trio.fail_after(1):
        await linger(ours)


# ---------------------------------------------------------------------------- close_now


async def test_close_now_closes_a_socket_at_once_even_when_cancelled() -> None:
    left, right = trio.socket.socketpair()
    stream = trio.SocketStream(left)
    with trio.CancelScope() as scope:
        scope.cancel()
        await close_now(stream)
    assert stream.socket.fileno() == -1
    right.close()


async def test_close_now_closes_any_other_stream_forcefully() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await close_now(ours)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"late")
    assert await peer.receive_some() == b""


# ---------------------------------------------------------------------------- describe_error


def test_describe_error_names_the_innermost_cause() -> None:
    try:
        try:
            raise ConnectionResetError("Connection reset by peer")
        except ConnectionResetError as exc:
            raise trio.BrokenResourceError from exc
    except trio.BrokenResourceError as exc:
        assert describe_error(exc) == "Connection reset by peer"


def test_describe_error_falls_back_to_the_message_then_the_type() -> None:
    assert describe_error(trio.ClosedResourceError("closed")) == "closed"
    assert describe_error(trio.BrokenResourceError()) == "BrokenResourceError"


# ---------------------------------------------------------------------------- PlainStream


async def test_plain_stream_sends_past_a_full_socket_buffer_and_receives() -> None:
    left, right = socket.socketpair()
    ours = streams.PlainStream(left)
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    big = bytes(range(256)) * 40_000  # ~10 MB: several waits for the peer to read
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(big):
            received.extend(await peer.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await ours.send_all(big)
    assert received == big
    await peer.send_all(b"QUIT\r\n")
    assert await ours.receive_some() == b"QUIT\r\n"
    await ours.send_eof()
    await ours.send_eof()  # a second half-close does nothing
    assert await peer.receive_some(10) == b""  # the peer sees our FIN
    await peer.aclose()
    assert await ours.receive_some() == b""
    await ours.aclose()
    await ours.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")


async def test_plain_stream_close_wakes_a_waiting_reader_and_reports_a_reset() -> None:
    left, right = socket.socketpair()
    ours = streams.PlainStream(left)

    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        ours.close()
    right.close()
    # Writing to a peer that is gone is a broken stream, not an OSError.
    a, b = socket.socketpair()
    mine = streams.PlainStream(a)
    b.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await mine.send_all(b"x" * 65536)
    mine.close()


async def test_a_read_after_a_reply_yields_then_reads_what_arrived_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer that arrives while other sessions have their turn is read with no
    wait on the descriptor (no epoll registration per command under load)."""
    left, right = socket.socketpair()
    left.setblocking(False)
    waits: list[int] = []
    real_wait, real_checkpoint = trio.lowlevel.wait_readable, trio.lowlevel.checkpoint

    async def counting_wait(fd: int) -> None:
        waits.append(fd)
        await real_wait(fd)

    async def turn_of_the_others() -> None:
        await real_checkpoint()
        right.sendall(b"MAIL FROM:<a@b>\r\n")  # the peer answered meanwhile

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    monkeypatch.setattr(trio.lowlevel, "checkpoint", turn_of_the_others)
    with trio.fail_after(5):
        received = await streams.receive_plain(left.fileno(), 1024, replied=True)
    assert received == b"MAIL FROM:<a@b>\r\n"
    assert waits == []
    monkeypatch.setattr(trio.lowlevel, "checkpoint", real_checkpoint)

    # Nothing arrives: the read waits for the answer.
    async with trio.open_nursery() as nursery:

        async def answer() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the read is waiting
            right.sendall(b"QUIT\r\n")

        nursery.start_soon(answer)
        assert await streams.receive_plain(left.fileno(), 1024, replied=True) == b"QUIT\r\n"
    assert waits == [left.fileno()]
    left.close()
    right.close()


async def test_a_session_alone_waits_for_the_answer_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no other session open nothing would run during a yield: the read waits on
    the descriptor straight away instead of failing first."""
    left, right = socket.socketpair()
    left.setblocking(False)
    events: list[str] = []
    real_wait, real_read = trio.lowlevel.wait_readable, streams.os.read

    async def logged_wait(fd: int) -> None:
        events.append("wait")
        await real_wait(fd)

    def logged_read(fd: int, size: int) -> bytes:
        events.append("read")
        return real_read(fd, size)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", logged_wait)
    monkeypatch.setattr(streams.os, "read", logged_read)
    async with trio.open_nursery() as nursery:

        async def answer() -> None:
            await trio.testing.wait_all_tasks_blocked()
            right.sendall(b"DATA\r\n")

        nursery.start_soon(answer)
        received = await streams.receive_plain(left.fileno(), 1024, replied=True, others=False)
    assert received == b"DATA\r\n"
    assert events == ["wait", "read"]
    left.close()
    right.close()


async def test_a_read_after_a_reply_is_a_checkpoint_even_with_input_waiting() -> None:
    """A session answering pipelined commands still gives the others their turn; a
    cancelled read raises before reading."""
    left, right = socket.socketpair()
    left.setblocking(False)
    right.sendall(b"RSET\r\n")
    with trio.testing.assert_checkpoints():
        assert await streams.receive_plain(left.fileno(), 1024, replied=True) == b"RSET\r\n"
    right.sendall(b"NOOP\r\n")
    with trio.CancelScope() as scope:
        scope.cancel()
        await streams.receive_plain(left.fileno(), 1024, replied=True)
    assert scope.cancelled_caught
    assert left.recv(1024) == b"NOOP\r\n"  # not consumed by the cancelled read
    left.close()
    right.close()
