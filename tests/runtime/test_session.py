"""The session's clocks and shutdown over in-memory streams, on Trio's virtual clock, and
what it does about a bug behind end of data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from relate_smtp.app import build_server
from relate_smtp.runtime.metrics import internal_error_count
from relate_smtp.runtime.session import Session
from relate_smtp.storage import NewEmail, SavedEmail
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import make_settings


class Peer:
    """The client end of an in-memory connection to one session."""

    def __init__(self, stream: trio.testing.MemoryStapledStream) -> None:  # type: ignore[name-defined]
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def reply(self) -> bytes:
        """The last line of the next (possibly multi-line) reply."""
        while True:
            line = await self.line()
            if line[3:4] != b"-":
                return line

    async def closed(self) -> bool:
        return await self.stream.receive_some(4096) == b""


async def start_session(
    nursery: trio.Nursery, tmp_path: Path, store: SqliteStore, *overrides: str
) -> tuple[Peer, Session]:
    settings = make_settings(tmp_path, "Smtp:RequireAuthentication=false", *overrides)
    server = build_server(settings, store=store)
    listener = server.listeners()[0][0]
    client_end, server_end = trio.testing.memory_stream_pair()
    session = Session(
        server_end, client=("192.0.2.1", 4000), listener=listener, services=server.services
    )
    nursery.start_soon(session.run)
    peer = Peer(client_end)
    assert (await peer.reply()).startswith(b"220 ")
    return peer, session


async def dribble(peer: Peer, data: bytes, size: int, pause: float) -> None:
    """Send ``data`` ``size`` bytes at a time, pausing between writes, until cut off."""
    try:
        for i in range(0, len(data), size):
            await peer.send(data[i : i + size])
            await trio.sleep(pause)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def open_transaction(peer: Peer) -> None:
    await peer.send(b"EHLO client\r\n")
    await peer.reply()
    await peer.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert [await peer.reply() for _ in range(3)][2].startswith(b"354")


async def test_idle_client_is_cut_at_the_command_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(nursery, tmp_path, store, "Smtp:CommandTimeoutSeconds=60")
        start = trio.current_time()
        assert (await peer.reply()).startswith(b"421 4.4.2")
        assert trio.current_time() - start == pytest.approx(60, abs=1)
        assert await peer.closed()


async def test_a_command_dribbled_in_does_not_extend_its_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(nursery, tmp_path, store, "Smtp:CommandTimeoutSeconds=60")
        start = trio.current_time()
        nursery.start_soon(dribble, peer, b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP", 1, 5)
        assert (await peer.reply()).startswith(b"421 4.4.2")
        assert trio.current_time() - start == pytest.approx(60, abs=5)


async def test_each_completed_command_restarts_the_command_clock(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(nursery, tmp_path, store, "Smtp:CommandTimeoutSeconds=60")
        for _ in range(5):
            await trio.sleep(50)
            await peer.send(b"NOOP\r\n")
            assert (await peer.reply()).startswith(b"250")
        await peer.send(b"QUIT\r\n")
        assert (await peer.reply()).startswith(b"221")


async def test_silence_during_data_is_cut_at_the_data_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(nursery, tmp_path, store, "Smtp:DataTimeoutSeconds=30")
        await open_transaction(peer)
        start = trio.current_time()
        assert (await peer.reply()).startswith(b"421 4.4.2")
        assert trio.current_time() - start == pytest.approx(30, abs=1)
    assert await store.list_emails() == []


async def test_a_trickle_below_the_minimum_data_rate_is_cut(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(
            nursery,
            tmp_path,
            store,
            "Smtp:DataTimeoutSeconds=30",
            "Smtp:MinDataRateBytesPerSecond=500",
        )
        await open_transaction(peer)
        start = trio.current_time()
        # 10 bytes every 5 s: each read is well inside the data timeout, but the
        # average rate (2 B/s) is far below 500 B/s.
        nursery.start_soon(dribble, peer, b"xxxxxxxx\r\n" * 100, 10, 5)
        assert await peer.reply() == b"421 4.4.2 Data rate too low, closing channel"
        elapsed = trio.current_time() - start
        assert elapsed < 60, "a per-read timeout alone would never cut this client"


async def test_a_steady_sender_above_the_rate_is_not_cut(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, _ = await start_session(
            nursery,
            tmp_path,
            store,
            "Smtp:DataTimeoutSeconds=30",
            "Smtp:MinDataRateBytesPerSecond=500",
            "Storage:DiscardMessages=true",
        )
        await open_transaction(peer)
        for _ in range(120):  # two minutes at ~1 KB/s, longer than the data timeout
            await peer.send(b"y" * 1022 + b"\r\n")
            await trio.sleep(1)
        await peer.send(b".\r\n")
        assert (await peer.reply()).startswith(b"250")


async def test_shutdown_tells_an_idle_session_421_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, session = await start_session(nursery, tmp_path, store)
        await peer.send(b"EHLO client\r\n")
        await peer.reply()
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        session.request_shutdown()
        assert (await peer.reply()).startswith(b"421 4.3.2")
        assert trio.current_time() == start
        assert await peer.closed()


async def test_shutdown_lets_a_message_in_flight_finish(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, session = await start_session(nursery, tmp_path, store)
        await open_transaction(peer)
        await peer.send(b"Subject: in flight\r\n\r\nbody\r\n")
        await trio.testing.wait_all_tasks_blocked()
        session.request_shutdown()
        await peer.send(b".\r\n")
        assert (await peer.reply()).startswith(b"250")
        assert (await peer.reply()).startswith(b"421 4.3.2")
        assert await peer.closed()
    assert len(await store.list_emails()) == 1


async def test_a_transaction_pipelined_behind_the_last_message_does_not_start(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, store: SqliteStore
) -> None:
    async with trio.open_nursery() as nursery:
        peer, session = await start_session(nursery, tmp_path, store)
        await open_transaction(peer)
        await peer.send(b"Subject: first\r\n\r\nbody\r\n")
        await trio.testing.wait_all_tasks_blocked()
        session.request_shutdown()
        await peer.send(
            b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: second\r\n\r\nbody\r\n.\r\n"
        )
        assert (await peer.reply()).startswith(b"250")
        assert (await peer.reply()).startswith(b"421 4.3.2")
        assert await peer.closed()
    assert [email.subject for email in await store.list_emails()] == ["first"]


# A bug behind end of data: answered 451 once per message (the sender keeps the mail),
# its traceback logged, and counted in ``smtp_internal_errors_total`` (which the ``smtp``
# health check shows: tests/runtime/test_network_checks.py), so it is seen instead of
# retried in silence.


async def broken_save(email: NewEmail) -> SavedEmail:
    raise RuntimeError("a bug in the store")


async def test_a_bug_is_answered_451_logged_and_counted(
    tmp_path: Path,
    store: SqliteStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(store, "save_email", broken_save)
    server = build_server(make_settings(tmp_path, "Smtp:RequireAuthentication=false"), store=store)
    listener = server.listeners()[0][0]
    client_end, server_end = trio.testing.memory_stream_pair()
    session = Session(
        server_end, client=("192.0.2.1", 4000), listener=listener, services=server.services
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        peer = Peer(client_end)
        assert (await peer.reply()).startswith(b"220 ")
        await peer.send(b"EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        for _ in range(3):
            await peer.reply()
        await peer.send(b"DATA\r\n")
        assert (await peer.reply()).startswith(b"354")
        await peer.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert (await peer.reply()).startswith(b"451 4.3.0")
        await peer.send(b"NOOP\r\n")  # the session goes on
        assert (await peer.reply()).startswith(b"250")
        await peer.send(b"QUIT\r\n")
        assert (await peer.reply()).startswith(b"221")

    assert internal_error_count(server.metrics.registry) == 1
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(failures) == 1
    assert "a bug in the store" in str(failures[0].exc_info[1])  # type: ignore[index]
