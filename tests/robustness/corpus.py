"""The hostile-input corpus: what scanners, broken clients and attackers send to port 25.

Each case drives one connection to a real server over a socket and checks that the
server answers with a defined reply, or closes, within its configured timeout. Most
cases are a :class:`Script` (bytes to send, the reply codes expected in order, and
whether the server must then keep the session usable or close it); the rest need their
own driver (TLS, a client that reads nothing, slowloris). The test suite runs each case
against a fresh server; the soak (``soak/run.py``) replays them under load.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import attrs
import trio

from relate_smtp.runtime.proxy import V2_SIGNATURE
from tests.robustness.helpers import Peer, dot_stuffed, message_bytes, unique_id

# Settings every corpus server runs with: short clocks so timeouts happen in seconds.
COMMAND_TIMEOUT = 2.0
DATA_TIMEOUT = 2.0
MAX_MESSAGE_SIZE = 200_000
MAX_RECIPIENTS = 100
MAX_ERRORS = 10
# Scheduling slack on top of a timeout before the case gives up on the server.
SLACK = 2.0

CORPUS_SETTINGS = (
    "Smtp:RequireAuthentication=false",
    f"Smtp:CommandTimeoutSeconds={COMMAND_TIMEOUT}",
    f"Smtp:DataTimeoutSeconds={DATA_TIMEOUT}",
    f"Smtp:TlsHandshakeTimeoutSeconds={COMMAND_TIMEOUT}",
    f"Smtp:MaxMessageSizeBytes={MAX_MESSAGE_SIZE}",
    f"Smtp:MaxRecipients={MAX_RECIPIENTS}",
    f"Smtp:MaxErrors={MAX_ERRORS}",
    "Security:RateLimit:BaseBackoffDelay=00:00:00.01",
    "Security:RateLimit:MaxBackoffDelay=00:00:00.01",
    "Security:RateLimit:MaxFailedAttempts=1000000",
)

RCPT = "rcpt@example.com"


@attrs.define
class Target:
    """The server under attack, as a case sees it."""

    port: int
    client_tls: ssl.SSLContext | None
    #: Called once the hostile input is in flight (a normal session then runs).
    in_flight: Callable[[], None] = lambda: None
    #: The client ports this case used, for matching log lines.
    ports: list[int] = attrs.field(factory=list)
    #: (Message-ID, copies the store must hold once the case's sessions have ended).
    expected: list[tuple[str, int]] = attrs.field(factory=list)

    def expect_stored(self, message_id: str, copies: int) -> None:
        self.expected.append((message_id, copies))

    async def connect(self, *, greeting: bool = True) -> Peer:
        peer = await Peer.connect(self.port, greeting=greeting)
        self.ports.append(peer.local_port)
        return peer


CaseRun = Callable[[Target], Awaitable[None]]


class CutByClock(AssertionError):
    """The server answered 421 and closed where the case expected the session to go
    on: its command clock ran out before the input had arrived. A failure on an idle
    machine; under a soak's load, the defined reply to a line that took too long."""


@attrs.frozen
class Case:
    name: str
    run: CaseRun
    #: The session outcome the server logs for it (regex on its summary line).
    outcome: str = r"quit|closed"
    #: Why the server is known to fail this case (the test is then a strict xfail).
    xfail: str | None = None


def _codes_match(expected: Sequence[str], codes: Sequence[int]) -> bool:
    text = " ".join(str(c) for c in codes)
    return re.fullmatch(" ".join(f"(?:{e})" for e in expected), text) is not None


def script(
    name: str,
    payload: bytes | Callable[[], bytes],
    expect: Sequence[str],
    then: Literal["open", "closed"],
    *,
    outcome: str = r"quit",
    within: float = SLACK,
    stored: Sequence[tuple[str, int]] = (),
    xfail: str | None = None,
) -> Case:
    """Send ``payload`` after the greeting in one write; the replies' codes must match
    ``expect`` (one regex per reply). ``then="open"``: a NOOP still gets 250 and QUIT
    221; ``then="closed"``: the server closes within ``within`` seconds with nothing
    more to say. ``stored``: Message-IDs (by the placeholder used in the payload) and
    how many copies the store must hold afterwards."""

    async def run(target: Target) -> None:
        ids = {placeholder: unique_id(name) for placeholder, _ in stored}
        data = payload() if callable(payload) else payload
        for placeholder, message_id in ids.items():
            data = data.replace(placeholder.encode(), message_id.encode())
        peer = await target.connect()
        try:
            await peer.send(data)
            target.in_flight()
            if then == "open":
                codes = await peer.replies(len(expect), timeout=within + 10)
                if codes and codes[-1] == 421 and not _codes_match(expect, codes):
                    raise CutByClock(f"{name}: expected {expect}, got {codes}")
                assert _codes_match(expect, codes), (expect, codes)
                assert (await peer.command(b"NOOP")).code == 250
                assert (await peer.command(b"QUIT")).code == 221
                assert await peer.until_closed(timeout=SLACK) == []
            else:
                started = time.monotonic()
                codes = await peer.until_closed(timeout=within + 10)
                elapsed = time.monotonic() - started
                assert _codes_match(expect, codes), (expect, codes)
                assert elapsed < within, f"closed after {elapsed:.1f}s, allowed {within}s"
        finally:
            await peer.aclose()
        for placeholder, copies in stored:
            target.expect_stored(ids[placeholder], copies)

    return Case(name, run, outcome, xfail)


# --------------------------------------------------------------------------- payloads

EHLO = b"EHLO hostile.example\r\n"
MAIL = b"MAIL FROM:<attacker@hostile.example>\r\n"
RCPT_LINE = f"RCPT TO:<{RCPT}>\r\n".encode()
TRANSACTION = EHLO + MAIL + RCPT_LINE + b"DATA\r\n"
STALL = COMMAND_TIMEOUT + SLACK  # a case that must be cut by the command clock
DATA_STALL = DATA_TIMEOUT + SLACK


def smuggling(fake_end: bytes) -> bytes:
    """A message whose body holds a fake end of data followed by a second transaction,
    all in one packet, then the real end. Only one message may come of it (the outer
    one, holding the inner as text)."""
    return (
        TRANSACTION
        + b"Message-ID: <OUTER>\r\nSubject: outer\r\n\r\nfirst"
        + fake_end
        + b"MAIL FROM:<attacker@hostile.example>\r\n"
        + RCPT_LINE
        + b"DATA\r\nMessage-ID: <INNER>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
        + b"\r\n.\r\nQUIT\r\n"
    )


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def proxy_v2_header() -> bytes:
    addresses = bytes([203, 0, 113, 9, 127, 0, 0, 1]) + (40000).to_bytes(2) + (587).to_bytes(2)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + len(addresses).to_bytes(2) + addresses


def b64(size: int, char: bytes = b"A") -> bytes:
    return char * size


# --------------------------------------------------------------------------- drivers


async def starttls_injection(target: Target) -> None:
    """RFC 3207 §4.2 / CVE-2011-0411: commands pipelined behind STARTTLS in clear must
    be discarded, not run inside the TLS session."""
    assert target.client_tls is not None
    peer = await target.connect()
    try:
        await peer.send(EHLO + b"STARTTLS\r\n" + MAIL + RCPT_LINE)
        target.in_flight()
        assert await peer.replies(2) == [250, 220]
        tls_stream = trio.SSLStream(
            peer.stream, target.client_tls, server_hostname="localhost", https_compatible=True
        )
        await tls_stream.do_handshake()
        secured = Peer(tls_stream)
        # Had the injected MAIL run, RCPT would now be accepted (or its replies arrive).
        assert (await secured.command(b"EHLO hostile.example")).code == 250
        assert (await secured.command(RCPT_LINE.rstrip())).code == 503
        assert (await secured.command(b"QUIT")).code == 221
    finally:
        await peer.aclose()


async def reads_nothing(target: Target) -> None:
    """Pipeline 100 000 NOOPs and never read a reply: the server's writes block, and
    its command clock must still cut the session."""
    peer = await target.connect()
    sent = trio.Event()

    async def flood() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await peer.send(b"NOOP\r\n" * 100_000)
        sent.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            target.in_flight()
            # The server stops reading when its replies back up; our send then blocks
            # until it gives up on us and closes.
            with trio.fail_after(STALL + 10):
                await sent.wait()
        # Now read: replies that were in the buffers, then the close.
        with trio.fail_after(STALL):
            while True:
                try:
                    data = await peer.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
    finally:
        await peer.aclose()


async def dribble_until_closed(
    peer: Peer,
    data: bytes,
    interval: float,
    *,
    timeout: float,  # noqa: ASYNC109
) -> list[int]:
    """Send ``data`` one byte per ``interval`` while reading replies; stop sending when
    the server closes. Returns the codes received."""

    async def dribble() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for byte in data:
                await peer.send(bytes([byte]))
                await trio.sleep(interval)  # the client's pace, not a wait

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        codes = await peer.until_closed(timeout=timeout)
        nursery.cancel_scope.cancel()
    return codes


async def slowloris_command(target: Target) -> None:
    """One byte at a time, slower than a command may take: cut with 421."""
    peer = await target.connect()
    started = time.monotonic()
    try:
        target.in_flight()
        line = b"EHLO slowloris.example.with.a.long.name\r\n"
        codes = await dribble_until_closed(peer, line, COMMAND_TIMEOUT / 10, timeout=STALL)
        assert codes == [421], codes
        assert time.monotonic() - started < STALL
    finally:
        await peer.aclose()


async def slowloris_data(target: Target) -> None:
    """A message body dribbled one byte per interval: below the minimum data rate, so
    cut with 421 4.4.2, and nothing stored."""
    peer = await target.connect()
    message_id = unique_id("slow-data")
    try:
        await peer.send(TRANSACTION)
        assert await peer.replies(4) == [250, 250, 250, 354]
        target.in_flight()
        started = time.monotonic()
        body = message_bytes(message_id, to=[RCPT], body="x" * 200)
        codes = await dribble_until_closed(peer, body, 0.1, timeout=DATA_STALL)
        assert codes == [421], codes
        assert time.monotonic() - started < DATA_STALL
    finally:
        await peer.aclose()
    target.expect_stored(message_id, 0)


async def data_without_end(target: Target) -> None:
    """DATA, half a message, then silence: cut by the data clock, nothing stored."""
    peer = await target.connect()
    message_id = unique_id("no-end")
    try:
        await peer.send(TRANSACTION + message_bytes(message_id, to=[RCPT]))
        target.in_flight()
        started = time.monotonic()
        codes = await peer.until_closed(timeout=DATA_STALL)
        assert codes == [250, 250, 250, 354, 421], codes
        assert time.monotonic() - started < DATA_STALL
    finally:
        await peer.aclose()
    target.expect_stored(message_id, 0)


async def oversized_without_end(target: Target) -> None:
    """Five times the size limit at full speed, never ended: memory stays bounded (the
    excess is discarded) and the data clock cuts it once the client stalls."""
    peer = await target.connect()
    message_id = unique_id("huge-no-end")
    try:
        await peer.send(TRANSACTION)
        assert await peer.replies(4) == [250, 250, 250, 354]
        await peer.send(message_bytes(message_id, to=[RCPT], attachment=5 * MAX_MESSAGE_SIZE))
        target.in_flight()
        started = time.monotonic()
        assert await peer.until_closed(timeout=DATA_STALL) == [421]
        assert time.monotonic() - started < DATA_STALL
    finally:
        await peer.aclose()
    target.expect_stored(message_id, 0)


async def oversized_with_end(target: Target) -> None:
    """Over the size limit and ended: 552 after the end (RFC 5321 §4.2.5), the
    session goes on, and nothing is stored."""
    peer = await target.connect()
    message_id = unique_id("huge")
    try:
        await peer.send(TRANSACTION)
        assert await peer.replies(4) == [250, 250, 250, 354]
        big = message_bytes(message_id, to=[RCPT], attachment=2 * MAX_MESSAGE_SIZE)
        await peer.send(dot_stuffed(big))
        target.in_flight()
        reply = await peer.reply()
        assert reply.code == 552, reply
        assert (await peer.command(b"NOOP")).code == 250
        assert (await peer.command(b"QUIT")).code == 221
    finally:
        await peer.aclose()
    target.expect_stored(message_id, 0)


async def thousands_of_recipients(target: Target) -> None:
    """5000 RCPTs in one packet: 100 accepted, the rest 452 4.5.3 (not protocol errors,
    so the session survives), and the message is stored once."""
    peer = await target.connect()
    message_id = unique_id("many-rcpts")
    count = 5000
    try:
        rcpts = b"".join(f"RCPT TO:<user{n}@example.com>\r\n".encode() for n in range(count))
        await peer.send(EHLO + MAIL + rcpts)
        target.in_flight()
        codes = await peer.replies(2 + count, timeout=30)
        assert codes[:2] == [250, 250]
        assert codes[2:] == [250] * MAX_RECIPIENTS + [452] * (count - MAX_RECIPIENTS), sorted(
            set(codes[2:])
        )
        assert (await peer.command(b"DATA")).code == 354
        await peer.send(dot_stuffed(message_bytes(message_id, to=[RCPT])))
        assert (await peer.reply()).code == 250
        assert (await peer.command(b"QUIT")).code == 221
    finally:
        await peer.aclose()
    target.expect_stored(message_id, 1)


async def idle(target: Target) -> None:
    """Connect and say nothing: 421 when the command clock runs out."""
    peer = await target.connect()
    try:
        target.in_flight()
        started = time.monotonic()
        assert await peer.until_closed(timeout=STALL) == [421]
        assert time.monotonic() - started < STALL
    finally:
        await peer.aclose()


async def hang_up_mid_data(target: Target) -> None:
    """Half a message, then a TCP reset: nothing stored."""
    peer = await target.connect()
    message_id = unique_id("reset")
    try:
        await peer.send(TRANSACTION + message_bytes(message_id, to=[RCPT])[:200])
        assert await peer.replies(4) == [250, 250, 250, 354]
        target.in_flight()
    finally:
        await peer.reset()
    target.expect_stored(message_id, 0)


def _many_lines(count: int, line: bytes) -> bytes:
    return line * count


# --------------------------------------------------------------------------- the corpus

SMUGGLING = [
    (b"\n.\n", "lf-dot-lf"),
    (b"\r.\r", "cr-dot-cr"),
    (b"\n.\r\n", "lf-dot-crlf"),
    (b"\r\n.\n", "crlf-dot-lf"),
    (b"\r.\r\n", "cr-dot-crlf"),
    (b"\r\n.\r", "crlf-dot-cr"),
]

CASES: tuple[Case, ...] = (
    *(
        script(
            f"smuggling {label}",
            smuggling(fake),
            ["250", "250", "250", "354", "250", "221"],
            "closed",
            stored=[("OUTER", 1), ("INNER", 0)],
        )
        for fake, label in SMUGGLING
    ),
    Case("starttls injection", starttls_injection),
    script("command of 10 KB", b"NOOP " + b"x" * 10_240 + b"\r\nNOOP\r\n", ["500", "250"], "open"),
    script(
        "MAIL of 10 KB",
        EHLO + b"MAIL FROM:<" + b"a" * 10_000 + b"@x.example>\r\n",
        ["250", "500"],
        "open",
    ),
    script("1 MB without CRLF, then CRLF", b"A" * (1 << 20) + b"\r\n", ["500"], "open"),
    script(
        "1 MB without CRLF, never ended",
        b"A" * (1 << 20),
        ["421"],
        "closed",
        outcome="timeout",
        within=STALL,
    ),
    script("NUL in a verb", b"NO\x00OP\r\n", ["500"], "open"),
    script("NUL in EHLO", b"EHLO a\x00b.example\r\n", ["501"], "open"),
    script("NUL in a path", EHLO + b"MAIL FROM:<a\x00b@x.example>\r\n", ["250", "5\\d\\d"], "open"),
    script("8-bit verb", b"\xff\xfe\xfd\xfc\r\n", ["500"], "open"),
    script("8-bit EHLO", b"EHLO h\xe9llo.example\r\n", ["501"], "open"),
    script(
        "UTF-8 path without SMTPUTF8",
        EHLO + b"MAIL FROM:<j\xc3\xa9@x.example>\r\n",
        ["250", "5\\d\\d"],
        "open",
    ),
    script(
        "invalid UTF-8 path with SMTPUTF8",
        EHLO + b"MAIL FROM:<\xff\xfe@x.example> SMTPUTF8\r\n",
        ["250", "5\\d\\d"],
        "open",
    ),
    script(
        "invalid UTF-8 recipient",
        EHLO + b"MAIL FROM:<a@x.example> SMTPUTF8\r\nRCPT TO:<\xc3\x28@example.com>\r\n",
        ["250", "250", "5\\d\\d"],
        "open",
    ),
    script(
        "TLS ClientHello on the plain port",
        tls_client_hello,
        ["(50\\d )*421"],
        "closed",
        outcome="timeout|quit|closed",
        within=STALL,
    ),
    script(
        "HTTP GET",
        b"GET / HTTP/1.1\r\nHost: mail.example\r\nUser-Agent: scanner\r\n\r\n",
        ["500", "500", "500", "500"],
        "open",
    ),
    script(
        "HTTP POST with many headers",
        b"POST /wp-login.php HTTP/1.1\r\n" + _many_lines(30, b"X-Header: y\r\n"),
        ["500"] * (MAX_ERRORS + 1) + ["421"],
        "closed",
        outcome="closed|quit|errors",
    ),
    script(
        "PROXY v1 where not enabled",
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n",
        ["500"],
        "open",
    ),
    script(
        "PROXY v2 where not enabled",
        proxy_v2_header,
        ["500", "500", "500", "221"],
        "closed",
    ),
    script(
        "AUTH PLAIN of 20 KB", EHLO + b"AUTH PLAIN " + b64(20_000) + b"\r\n", ["250", "500"], "open"
    ),
    script(
        "AUTH PLAIN not base64", EHLO + b"AUTH PLAIN !!!not*base64!!!\r\n", ["250", "501"], "open"
    ),
    script(
        "AUTH PLAIN of 12 KB of garbage",
        EHLO + b"AUTH PLAIN " + b64(12_000, b"QUFB")[:12_000] + b"\r\n",
        ["250", "5\\d\\d"],
        "open",
    ),
    script(
        "AUTH LOGIN with a 20 KB answer",
        EHLO + b"AUTH LOGIN\r\n" + b64(20_000) + b"\r\n",
        ["250", "334", "500"],
        "open",
    ),
    script(
        "AUTH LOGIN with bad base64",
        EHLO + b"AUTH LOGIN\r\n%%%%\r\n",
        ["250", "334", "501"],
        "open",
    ),
    script("AUTH unknown mechanism", EHLO + b"AUTH CRAM-MD5\r\n", ["250", "504"], "open"),
    script(
        "AUTH PLAIN wrong credentials",
        EHLO + b"AUTH PLAIN AG5vYm9keUBleGFtcGxlLmNvbQBya19ub3RhcmVhbGtleQ==\r\n",
        ["250", "535|454"],
        "open",
    ),
    script(
        "too many errors",
        _many_lines(20, b"XYZZY\r\n"),
        ["500"] * (MAX_ERRORS + 1) + ["421"],
        "closed",
        outcome="closed|quit|errors",
    ),
    script(
        "BDAT of absurd size",
        EHLO + MAIL + RCPT_LINE + b"BDAT 99999999999999999999 LAST\r\n",
        ["250", "250", "250", "421"],
        "closed",
        outcome="timeout",
        within=DATA_STALL,
    ),
    Case("thousands of RCPTs", thousands_of_recipients),
    Case("DATA without end", data_without_end, outcome="timeout"),
    Case("oversized DATA without end", oversized_without_end, outcome="timeout"),
    Case("oversized DATA with end", oversized_with_end),
    Case("client that reads nothing", reads_nothing, outcome="client not reading"),
    Case("slowloris command", slowloris_command, outcome="timeout"),
    Case("slowloris data", slowloris_data, outcome="timeout"),
    Case("idle client", idle, outcome="timeout"),
    Case("hang-up mid-DATA", hang_up_mid_data, outcome="peer hung up|closed"),
)
