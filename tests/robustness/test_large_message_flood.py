"""Bounded memory under a flood of large messages, and spool files that never outlive it.

``relate-smtp serve`` runs as its own process with the MX listener open and the
attachment limit raised so the messages are accepted: 20 connections each send a
40 MB message and 100 connections a 5 MB one, all at once. Every 250 must be a stored
message, the server's peak RSS stays under 400 MiB (it was 2.1 GB for the 20 alone when
messages were held whole in memory), and no spool file is left after the run, nor
after the server is killed mid-message and started again.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
import trio

from tests.e2e.helpers import ServeProcess
from tests.robustness.helpers import Peer, sqlite_stored

DB_NAME = "flood.db"
HOSTED = "hosted.example"
POSTMASTER = f"postmaster@{HOSTED}"
RSS_BUDGET_MIB = 400


def body(size: int) -> bytes:
    """A dot-stuffed multipart body of about ``size`` octets with one attachment, shared
    by every message of that size (each message gets its own header block)."""
    attachment = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nlarge message\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=payload.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--B--\r\n.\r\n"
    )


async def send_large(port: int, shared_body: bytes) -> tuple[str, int]:
    """One message over its own connection; (Message-ID, final reply code)."""
    message_id = f"flood-{uuid.uuid4().hex}@robust.example"
    head = (
        f"From: <sender@sender.example>\r\nTo: <{POSTMASTER}>\r\nSubject: flood\r\n"
        f"Message-ID: <{message_id}>\r\n"
    ).encode()
    peer = await Peer.connect(port)
    try:
        await peer.send(
            f"EHLO flood.example\r\nMAIL FROM:<sender@sender.example>\r\n"
            f"RCPT TO:<{POSTMASTER}>\r\nDATA\r\n".encode()
        )
        assert await peer.replies(4, timeout=60) == [250, 250, 250, 354]
        await peer.send(head)
        await peer.send(shared_body)
        return message_id, (await peer.reply(timeout=300)).code
    finally:
        await peer.aclose()


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) / 1024


def serve(tmp_path: Path, spool: Path, *extra: str) -> ServeProcess:
    return ServeProcess(
        tmp_path,
        *extra,
        f"--Storage:SqlitePath={DB_NAME}",
        f"--Storage:SpoolPath={spool}",
        "--Smtp:Mx:Enabled=true",
        "--Smtp:Mx:Port=0",
        f"--Smtp:Mx:HostedDomains:0={HOSTED}",
        "--Smtp:MaxAttachmentSizeBytes=60000000",
    )


@pytest.mark.slow
async def test_a_flood_of_large_messages_stays_within_memory(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    large, medium = body(40_000_000), body(5_000_000)
    server = serve(tmp_path, spool)
    results: list[tuple[str, int]] = []
    try:
        await trio.to_thread.run_sync(server.wait_listening, {"mx"})
        port = server.ports["mx"]
        started = time.monotonic()

        async def one(shared: bytes) -> None:
            results.append(await send_large(port, shared))

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one, large)
                for _ in range(100):
                    nursery.start_soon(one, medium)
        elapsed = time.monotonic() - started
        rss = peak_rss_mib(server.proc.pid)
        left = sorted(p.name for p in spool.iterdir())
    finally:
        server.kill()

    codes = [code for _, code in results]
    print(
        f"flood: {codes.count(250)} of {len(codes)} accepted in {elapsed:.1f} s, "
        f"server peak RSS {rss:.0f} MiB, spool files left {len(left)}"
    )
    assert codes == [250] * 120, sorted(set(codes))
    assert rss < RSS_BUDGET_MIB
    assert left == []
    stored, orphans = sqlite_stored(str(tmp_path / DB_NAME))
    assert orphans == 0
    assert set(stored) == {message_id for message_id, _ in results}
    assert all(len(copies) == 1 and copies[0].attachments == 1 for copies in stored.values())


async def test_spool_files_of_a_killed_server_are_removed_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    server = serve(tmp_path, spool, "--Logging:LogLevel:Default=Debug")
    try:
        await trio.to_thread.run_sync(server.wait_listening, {"mx"})
        peer = await Peer.connect(server.ports["mx"])
        await peer.send(
            f"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<{POSTMASTER}>\r\nDATA\r\n".encode()
        )
        assert await peer.replies(4) == [250, 250, 250, 354]
        await peer.send(b"Subject: half\r\n\r\n" + b"x" * 76 * 30_000)  # past the threshold
        await trio.to_thread.run_sync(server.wait_for, "message spooled to")
        (spooled,) = spool.iterdir()
        assert spooled.stat().st_mode & 0o777 == 0o600
        server.signal(signal.SIGKILL)
        await trio.to_thread.run_sync(server.wait_exit)
        await peer.aclose()
        assert list(spool.iterdir()) == [spooled]  # a killed process cannot clean up
    finally:
        server.kill()

    restarted = serve(tmp_path, spool)
    try:
        await trio.to_thread.run_sync(restarted.wait_listening, {"mx"})
        assert list(spool.iterdir()) == []
        restarted.wait_for("removed 1 spool file")
    finally:
        restarted.kill()
