"""Graceful shutdown of ``relate-smtp serve`` (SPEC §10), as an operator's SIGTERM."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    DB_NAME,
    ServeProcess,
    SmtpLineClient,
    create_account,
    free_port,
    make_settings,
    proxy_v1,
    run_cli,
    running_server,
)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.kill()


def read_reply(sock: socket.socket) -> bytes:
    """Whatever the server sends before closing (bounded by the socket timeout)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_sigterm_finishes_data_in_flight_and_tells_idle_sessions_421(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    account = create_account(tmp_path, "alice@example.com")
    server = ServeProcess(
        tmp_path, f"--Storage:SqlitePath={DB_NAME}", "--Smtp:ShutdownTimeoutSeconds=15"
    )
    serve.append(server)
    server.wait_listening({"submission"})
    port = server.ports["submission"]

    busy = smtplib.SMTP("127.0.0.1", port, timeout=10)
    busy.ehlo("busy.example")
    busy.login("alice@example.com", account.key)
    assert busy.mail("alice@example.com")[0] == 250
    assert busy.rcpt("bob@example.org")[0] == 250
    busy.putcmd("data")
    assert busy.getreply()[0] == 354
    busy.send(
        b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
        b"Subject: In flight at SIGTERM\r\n\r\nFirst half of the body,\r\n"
    )

    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle_file = idle.makefile("rb")
    assert idle_file.readline().startswith(b"220 ")
    idle.sendall(b"EHLO idle.example\r\n")
    while not (line := idle_file.readline()).startswith(b"250 "):
        assert line.startswith(b"250-"), line

    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    server.wait_for(r"Shutting down", timeout=10)

    # The idle session is told at once, without sending anything.
    told = idle_file.readline()
    assert told.startswith(b"421 4.3.2"), told
    assert time.monotonic() - signalled < 3
    assert idle_file.read() == b"", "the idle session is closed after its 421"
    idle.close()

    # The listener is closed: nobody new gets in.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    # The message in flight finishes and is acknowledged.
    busy.send(b"second half.\r\n.\r\n")
    code, text = busy.getreply()
    assert code == 250, (code, text)
    acknowledged = time.monotonic()
    # Then the session ends with 421 at its next command boundary.
    assert busy.sock is not None
    after = read_reply(busy.sock)
    assert after == b"" or after.startswith(b"421 4.3.2"), after
    busy.close()

    assert server.wait_exit(timeout=10) == 0, server.log
    assert time.monotonic() - acknowledged < 3
    assert "Traceback" not in server.log

    listed = run_cli(tmp_path, "mail", "list", f"--Storage:SqlitePath={DB_NAME}").stdout
    assert "In flight at SIGTERM" in listed


def test_sigterm_with_only_idle_sessions_exits_at_once(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    server = ServeProcess(tmp_path, f"--Storage:SqlitePath={DB_NAME}")
    serve.append(server)
    server.wait_listening({"submission"})
    port = server.ports["submission"]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    for sock in idle:
        assert sock.recv(4096).startswith(b"220 ")
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait_exit(timeout=10) == 0, server.log
    assert time.monotonic() - started < 3
    for sock in idle:
        assert read_reply(sock).startswith(b"421 4.3.2")
        sock.close()


# --------------------------------------------------------------------------- in-process

SHUTDOWN_BUDGET = 2.0


@pytest.mark.parametrize("where", ["implicit-tls-before-handshake", "proxy-before-header"])
async def test_connection_not_yet_in_a_session_does_not_hold_shutdown(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, where: str
) -> None:
    settings = make_settings(
        tmp_path,
        f"Smtp:SecurePort={free_port()}",
        "Smtp:ProxyProtocol:Listeners:0=submission",
        "Smtp:ProxyProtocol:TrustedNetworks:0=127.0.0.0/8",
        "HealthCheck:DnsMxDomain=",
        f"Smtp:ShutdownTimeoutSeconds={SHUTDOWN_BUDGET}",
    )
    name = "submission-tls" if where.startswith("implicit") else "submission"
    async with running_server(settings, store, tls_context=server_tls) as running:
        silent = await SmtpLineClient.connect(running.port(name))
        # A full session proves the server has accepted and is serving connections.
        probe = await SmtpLineClient.connect(
            running.port("submission"), prefix=proxy_v1("192.0.2.1")
        )
        assert (await probe.reply())[0] == 220
        started = trio.current_time()
        running.server.shutdown()
        assert (await probe.reply())[:1] == (421,)
        await probe.aclose()
    took = trio.current_time() - started
    assert await silent.at_eof(timeout=1)
    await silent.aclose()
    assert took < SHUTDOWN_BUDGET / 2, f"shutdown took {took:.2f} s"


def test_data_in_flight_is_cut_at_the_shutdown_timeout(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    account = create_account(tmp_path, "alice@example.com")
    server = ServeProcess(
        tmp_path, f"--Storage:SqlitePath={DB_NAME}", "--Smtp:ShutdownTimeoutSeconds=1"
    )
    serve.append(server)
    server.wait_listening({"submission"})
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as stalled:
        stalled.login("alice@example.com", account.key)
        assert stalled.mail("alice@example.com")[0] == 250
        assert stalled.rcpt("bob@example.org")[0] == 250
        stalled.putcmd("data")
        assert stalled.getreply()[0] == 354
        stalled.send(b"Subject: never finished\r\n\r\nThe client stops here")
        server.signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.wait_exit(timeout=10) == 0, server.log
        assert time.monotonic() - started < 1 + 2
        assert stalled.sock is not None
        leftover = read_reply(stalled.sock)
        assert leftover == b"" or leftover.startswith(b"421 "), leftover
    assert (
        "never finished"
        not in run_cli(tmp_path, "mail", "list", f"--Storage:SqlitePath={DB_NAME}").stdout
    )


async def test_shutdown_after_starttls_reply_sends_no_plaintext(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext
) -> None:
    settings = make_settings(
        tmp_path, "HealthCheck:DnsMxDomain=", f"Smtp:ShutdownTimeoutSeconds={SHUTDOWN_BUDGET}"
    )
    async with running_server(settings, store, tls_context=server_tls) as running:
        smtp = await SmtpLineClient.connect(running.port("submission"))
        assert (await smtp.reply())[0] == 220
        assert (await smtp.command("EHLO client.example"))[0] == 250
        assert (await smtp.command("STARTTLS"))[0] == 220
        running.server.shutdown()
    # The client would now send its ClientHello; plaintext SMTP here breaks its handshake.
    rest = b""
    with trio.fail_after(5):
        while chunk := await smtp.stream.receive_some(4096):
            rest += chunk
    await smtp.aclose()
    assert rest == b"", rest
