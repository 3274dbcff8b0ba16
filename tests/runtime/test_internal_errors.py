"""A bug behind end of data: answered 451 once per message (the sender keeps the mail),
its traceback logged, counted in ``smtp_internal_errors_total``, and shown by the
``smtp`` health check, so it is seen instead of retried in silence."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from relate_smtp.app import build_server
from relate_smtp.runtime.metrics import internal_error_count
from relate_smtp.runtime.network_checks import INTERNAL_ERROR_WINDOW, smtp_check
from relate_smtp.runtime.session import Session
from relate_smtp.storage import NewEmail, SavedEmail
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.harness import make_settings
from tests.runtime.test_session import Peer


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


async def greeter(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(b"220 ready\r\n")
        await stream.receive_some(100)
        await stream.send_all(b"221 bye\r\n")


async def test_the_smtp_check_shows_internal_errors(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, greeter, 0, host="127.0.0.1"))
    port = int(listeners[0].socket.getsockname()[1])
    errors = 0
    now = 1000.0
    check = smtp_check(
        "127.0.0.1", port, proxy_local=False, internal_errors=lambda: errors, clock=lambda: now
    )

    healthy = await check.run()
    assert (healthy.status, healthy.data) == ("Healthy", None)  # the original's, unchanged

    errors = 2
    degraded = await check.run()
    assert degraded.status == "Degraded"
    assert degraded.data == {"internalErrors": 2}
    assert degraded.description is not None and "2 internal errors" in degraded.description

    now += INTERNAL_ERROR_WINDOW
    settled = await check.run()
    assert (settled.status, settled.data) == ("Healthy", {"internalErrors": 2})

    errors = 3
    assert (await check.run()).status == "Degraded"
