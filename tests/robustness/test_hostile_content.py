"""Hostile content on port 25: no single message may stall the server or exhaust it.

``relate-smtp serve`` runs as its own process with the MX listener open. Each hostile
message of the security review goes to ``postmaster@<hosted domain>`` (always accepted,
no login needed) while a second client keeps connecting and delivering: its greeting
and its 250 must each come within a second, throughout. Each hostile message gets its
defined reply; every 250 is stored, nothing refused is; the server's peak RSS stays
within its budget (parsing of large messages happens in worker processes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from tests.e2e.helpers import ServeProcess
from tests.robustness.helpers import (
    Ledger,
    Peer,
    message_bytes,
    send_message,
    sqlite_stored,
    unique_id,
)

DB_NAME = "hostile.db"
HOSTED = "hosted.example"
POSTMASTER = f"postmaster@{HOSTED}"
# The second client's bound for a greeting and for a 250, as the issue sets it.
RESPONSIVE_SECONDS = 1.0
# Peak RSS of the server process: large messages go to spool files as they arrive and
# are parsed by worker processes, so the server stays near its baseline (~60 MiB).
RSS_BUDGET_MIB = 200


@attrs.frozen
class Hostile:
    name: str
    build: Callable[[str], bytes]  # Message-ID → raw message
    reply: int
    copies: int = 1  # sent at once on separate connections
    header_rows: int | None = None  # EmailRecipients rows expected when accepted


def head(message_id: str, extra: bytes = b"") -> bytes:
    return (
        b"From: Mallory <mallory@attacker.example>\r\nSubject: hostile\r\n"
        + f"Message-ID: <{message_id}>\r\n".encode()
        + extra
    )


def tiny_parts(message_id: str, *, size: int, attachment: bool) -> bytes:
    disposition = b"Content-Disposition: attachment\r\n" if attachment else b""
    part = b"--B\r\n" + disposition + b"\r\nx\r\n"
    count = size // len(part)
    return (
        head(message_id, b"Content-Type: multipart/mixed; boundary=B\r\n")
        + b"\r\n"
        + part * count
        + b"--B--\r\n"
    )


def empty_lines(message_id: str) -> bytes:
    return (
        head(message_id, b"Content-Type: multipart/mixed; boundary=B\r\n")
        + b"\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
        + b"\r\n" * 25_000_000
        + b"--B--\r\n"
    )


def addresses(count: int) -> bytes:
    return b", ".join(b"u%d@example.org" % i for i in range(count))


def with_header(header: bytes) -> Callable[[str], bytes]:
    """A one-line message whose hostile part is the header line ``header``."""
    return lambda message_id: head(message_id, header + b"\r\n") + b"\r\nx\r\n"


CASES = [
    # Catastrophic backtracking: 18 s of CPU for 4 KB before.
    Hostile("cubic-to", with_header(b"To: a@b.c," + b" " * 4000 + b"x y"), 250),
    # Quadratic msg-id scan: 7.4 s for 60 KB, 49 s for 150 KB before.
    Hostile("references-60k", with_header(b"References: " + b'a\\"' * 20_000), 250),
    Hostile("references-150k", with_header(b"References: " + b'a\\"' * 50_000), 554),
    # MIME amplification: 3.8 million parts in 49 MB, two at once (7.0 GB before).
    Hostile(
        "million-parts",
        lambda m: tiny_parts(m, size=49_000_000, attachment=False),
        554,
        copies=2,
    ),
    # 50 MB of empty lines in one part (2.1 GB before): past the parse memory limit.
    Hostile("empty-lines", empty_lines, 451),
    # Row explosion: a 6.6 MB To header (555,555 rows before) and one within the limit.
    Hostile("to-6mb", with_header(b"To: " + addresses(400_000)), 554),
    Hostile("to-99k", with_header(b"To: " + addresses(5_000)), 250, header_rows=1000),
    # 10 MB of tiny attachments (232,558 rows before).
    Hostile("tiny-attachments", lambda m: tiny_parts(m, size=10_000_000, attachment=True), 554),
]


@attrs.define
class Responsiveness:
    """The second client's worst greeting and 250 times, and how many it delivered."""

    worst_greeting: float = 0.0
    worst_accept: float = 0.0
    delivered: int = 0


async def keep_delivering(
    port: int, ledger: Ledger, seen: Responsiveness, stop: trio.Event
) -> None:
    """Connect, deliver one small message, quit; again and again until ``stop`` is set
    (between messages, so that every message it sent has its outcome recorded)."""
    while not stop.is_set():
        started = time.monotonic()
        peer = await Peer.connect(port)
        seen.worst_greeting = max(seen.worst_greeting, time.monotonic() - started)
        try:
            assert (await peer.command(b"EHLO second.example")).code == 250
            message_id = unique_id("second")
            ledger.rows[message_id] = 1
            started = time.monotonic()
            sent = await send_message(
                peer,
                message_id,
                message_bytes(message_id, to=[POSTMASTER]),
                recipients=[POSTMASTER],
                ledger=ledger,
            )
            seen.worst_accept = max(seen.worst_accept, time.monotonic() - started)
            assert sent.outcome == "accepted", sent
            seen.delivered += 1
        finally:
            await peer.aclose()


async def send_hostile(port: int, case: Hostile, message_id: str, ledger: Ledger) -> int:
    peer = await Peer.connect(port)
    try:
        assert (await peer.command(b"EHLO hostile.example")).code == 250
        sent = await send_message(
            peer,
            message_id,
            case.build(message_id),
            recipients=[POSTMASTER],
            ledger=ledger,
            timeout=120,
        )
        assert sent.code is not None, sent
        return sent.code
    finally:
        await peer.aclose()


async def send_at_once(port: int, case: Hostile, ids: list[str], ledger: Ledger) -> list[int]:
    """Each message of ``ids`` on its own connection, all at once; their final codes."""
    codes: list[int] = []

    async def one(message_id: str) -> None:
        codes.append(await send_hostile(port, case, message_id, ledger))

    async with trio.open_nursery() as senders:
        for message_id in ids:
            senders.start_soon(one, message_id)
    return codes


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) / 1024


@pytest.mark.slow
async def test_hostile_messages_neither_stall_nor_exhaust_the_server(tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path,
        f"--Storage:SqlitePath={DB_NAME}",
        "--Smtp:Mx:Enabled=true",
        "--Smtp:Mx:Port=0",
        f"--Smtp:Mx:HostedDomains:0={HOSTED}",
        "--Smtp:MaxConnectionsPerIp=0",
        "--Smtp:Mime:ParseMemoryBytes=805306368",
    )
    ledger = Ledger()
    replies: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    expected: dict[str, tuple[Hostile, list[str]]] = {}
    seen = Responsiveness()
    try:
        await trio.to_thread.run_sync(server.wait_listening, {"mx"})
        port = server.ports["mx"]
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                stop = trio.Event()
                nursery.start_soon(keep_delivering, port, ledger, seen, stop)
                for case in CASES:
                    ids = [unique_id(case.name) for _ in range(case.copies)]
                    expected[case.name] = (case, ids)
                    started = time.monotonic()
                    replies[case.name] = await send_at_once(port, case, ids, ledger)
                    seconds[case.name] = round(time.monotonic() - started, 1)
                stop.set()
        rss = peak_rss_mib(server.proc.pid)
    finally:
        server.kill()

    print(
        f"hostile content: replies={replies} seconds={seconds} "
        f"second client: {seen.delivered} delivered, "
        f"worst greeting {seen.worst_greeting * 1000:.0f} ms, worst 250 "
        f"{seen.worst_accept * 1000:.0f} ms; server peak RSS {rss:.0f} MiB"
    )
    for name, (case, _ids) in expected.items():
        assert replies[name] == [case.reply] * case.copies, (name, replies[name])
    assert seen.delivered >= len(CASES)
    assert seen.worst_greeting < RESPONSIVE_SECONDS
    assert seen.worst_accept < RESPONSIVE_SECONDS
    assert rss < RSS_BUDGET_MIB
    assert "Traceback" not in server.log, server.log

    stored, orphans = sqlite_stored(str(tmp_path / DB_NAME))
    assert orphans == 0
    accepted = {m for m, outcome in ledger.told.items() if outcome == "accepted"}
    assert set(stored) == accepted  # every 250 is stored, nothing refused is
    for case, ids in expected.values():
        if case.header_rows is not None:
            for message_id in ids:
                (message,) = stored[message_id]
                assert message.recipients == case.header_rows
