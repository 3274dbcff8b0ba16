"""Fuzz target for the protocol core: arbitrary bytes in, no exception, bounded state.

``fuzz_one(data)`` reads a three-byte header, then feeds the rest to a
`ServerConnection` as a correct runtime and application would:

- byte 0 selects the configuration (see `config_for`);
- byte 1 is a separator: the stream is cut into reads just after each occurrence;
- byte 2 answers decisions, one bit each in turn (1 accept, 0 reject);
- the rest is what the peer sends, followed by end of input.

It asserts that nothing raises (`LocalProtocolError` included: the driver is correct),
that output is well-formed replies and at most a few per line of input, that the receive
buffer never exceeds the line limits, and that a message never grows past the size limit.

Run ``python fuzz/fuzz_server.py`` to fuzz: with atheris when it is installed, otherwise
a simple mutation loop over the seeds in ``fuzz/corpus/`` (``--help`` for options).
CI runs `fuzz_one` through hypothesis (``tests/protocol/test_fuzz.py``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import random
import re
import sys
from pathlib import Path
from typing import Final

import attrs

from relate_smtp.protocol import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    BareLineEndings,
    ConnectionClosed,
    Decision,
    Event,
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    ProtocolConfig,
    Reply,
    ServerConnection,
    StartTLS,
    State,
)

CORPUS: Final = Path(__file__).parent / "corpus"
HEADER: Final = 3
#: No reply the core or this application sends is longer (the EHLO list is ~200 bytes).
MAX_REPLY: Final = 1024
#: Replies one read may cause beyond one per LF it holds: a BDAT chunk completed by
#: bytes without an LF, one 421 for too many errors, and the greeting.
EXTRA_REPLIES: Final = 3
#: What DotReader may hold back between reads (documented in relate_smtp/protocol/_data.py).
MAX_HELD: Final = 5

REJECTION: Final = Reply(550, "5.7.1", ("Refused by the fuzz application",))
#: Decisions that 550 cannot answer (the core checks the code fits the decision).
REJECTIONS: Final[dict[type[Decision], Reply]] = {
    AuthRequest: Reply(535, "5.7.8", ("Refused by the fuzz application",)),
    StartTLS: Reply(454, "4.7.0", ("Refused by the fuzz application",)),
}
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*")


def config_for(flags: int) -> ProtocolConfig:
    """The configuration selected by header byte 0, one feature or limit per bit."""
    small = bool(flags & 0x08)
    return ProtocolConfig(
        bare_line_endings=BareLineEndings.REJECT if flags & 0x01 else BareLineEndings.NORMALIZE,
        tls_available=bool(flags & 0x02),
        chunking=not flags & 0x04,
        max_message_size=1000 if small else 1_000_000,
        max_recipients=2 if small else 100,
        max_errors=3 if small else 10,
        max_command_line=64 if small else 512,
        max_auth_line=256 if small else 12288,
        auth_required=not flags & 0x10,
        allow_insecure_auth=not flags & 0x20,
        smtputf8=not flags & 0x40,
        eightbitmime=not flags & 0x40,
        auth_enabled=not flags & 0x80,
    )


def line_cap(config: ProtocolConfig) -> int:
    """The most a receive buffer may hold: its longest line limit."""
    mail = config.mail_line_limit(tls_active=True)
    return max(config.max_command_line, config.max_auth_line, mail)


def split_reads(stream: bytes, separator: int | None) -> list[bytes]:
    """``stream`` cut just after each ``separator`` byte (one read when None)."""
    if separator is None or not stream:
        return [stream] if stream else []
    reads: list[bytes] = []
    start = 0
    mark = bytes([separator])
    while (end := stream.find(mark, start)) >= 0:
        reads.append(stream[start : end + 1])
        start = end + 1
    if start < len(stream):
        reads.append(stream[start:])
    return reads


def check_output(out: bytes, read: bytes) -> int:
    """Check ``out`` is whole reply lines, not more than ``read`` can cause; count them."""
    if not out:
        return 0
    assert out.endswith(b"\r\n"), out[-50:]
    lines = out.split(b"\r\n")[:-1]
    for line in lines:
        assert _REPLY_LINE.fullmatch(line), line[:100]
    finals = sum(1 for line in lines if line[3:4] == b" ")
    assert finals <= read.count(b"\n") + EXTRA_REPLIES, (finals, read[:200])
    assert len(out) <= MAX_REPLY * (read.count(b"\n") + EXTRA_REPLIES), len(out)
    return finals


@attrs.define
class Report:
    """What one input did, so tests can tell that seeds reach what they are for."""

    reads: int = 0
    replies: int = 0
    events: collections.Counter[str] = attrs.field(factory=collections.Counter)
    handshakes: int = 0
    final_state: State = State.CONNECTED


class _Driver:
    """A correct runtime and application around one connection, checking as it goes."""

    def __init__(self, config: ProtocolConfig, answers: int) -> None:
        self.config = config
        self.conn = ServerConnection(config)
        self.answers = answers
        self.decisions = 0
        self.message = 0  # octets of the current message delivered so far
        self.closed = False
        self.report = Report()
        self.report.replies += check_output(self.conn.data_to_send(), b"")

    def feed(self, read: bytes) -> None:
        self.report.reads += 1
        self.conn.receive_data(read)
        self.drain()
        self.report.replies += check_output(self.conn.data_to_send(), read)
        self.check_bounds()

    def drain(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if event is PAUSED:
                assert conn.state is State.TLS_HANDSHAKE
                self.report.handshakes += 1
                conn.tls_started()
                continue
            assert isinstance(event, Event), event
            self.report.events[type(event).__name__] += 1
            self.on_event(event)
            if isinstance(event, ConnectionClosed):
                self.closed = True
                assert conn.next_event() == ConnectionClosed()  # terminal
                return

    def on_event(self, event: Event) -> None:
        limit = self.config.max_message_size
        if isinstance(event, MessageStart):
            self.message = 0
        elif isinstance(event, MessageChunk):
            assert event.data, "empty MessageChunk"
            self.message += len(event.data)
            assert not limit or self.message <= limit, (self.message, limit)
        elif isinstance(event, MessageEnd):
            assert event.size == self.message, (event.size, self.message)
        elif isinstance(event, MessageAborted):
            assert event.reply.code >= 400
        if isinstance(event, Decision):
            accept = self.answers >> (self.decisions % 8) & 1
            self.decisions += 1
            if accept:
                self.conn.accept()
            else:
                self.conn.reject(REJECTIONS.get(type(event), REJECTION))

    def check_bounds(self) -> None:
        conn, config = self.conn, self.config
        assert len(conn._buffer) <= line_cap(config)
        reader = conn._dot
        assert reader is None or len(reader._held) <= MAX_HELD

    def finish(self) -> Report:
        if not self.closed:
            self.conn.receive_data(b"")
            self.drain()
            self.report.replies += check_output(self.conn.data_to_send(), b"")
        assert self.closed and self.conn.closed
        self.report.final_state = self.conn.state
        return self.report


def run_one(data: bytes) -> Report:
    """Drive one connection with ``data`` (header, then the peer's bytes); check it."""
    flags = data[0] if len(data) > 0 else 0
    separator = data[1] if len(data) > 1 else None
    answers = data[2] if len(data) > 2 else 0xFF
    driver = _Driver(config_for(flags), answers)
    for read in split_reads(data[HEADER:], separator):
        driver.feed(read)
        if driver.closed:
            break  # a runtime stops reading once the session is over
    return driver.finish()


def fuzz_one(data: bytes) -> None:
    """The fuzz entry point: raises (AssertionError or other) only on a core bug."""
    run_one(data)


# --- standalone fuzzing ------------------------------------------------------------------

TOKENS: Final = [
    b"EHLO x\r\n",
    b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
    b"AUTH LOGIN\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"DATA\r\n",
    b"BDAT 4\r\n",
    b"BDAT 0 LAST\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\x00",
    b"\xff",
]


def mutate(data: bytes, seeds: list[bytes], rng: random.Random) -> bytes:
    """A few random edits: bit flips, insertions, deletions, duplication, splicing."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randint(0, len(buf))
        match rng.randrange(6):
            case 0 if buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            case 1:
                buf[where:where] = bytes([rng.randrange(256)])
            case 2:
                buf[where:where] = rng.choice(TOKENS)
            case 3 if buf:
                del buf[where : where + rng.randint(1, 16)]
            case 4 if buf:
                start = rng.randrange(len(buf))
                buf[where:where] = buf[start : start + rng.randint(1, 64)]
            case _:
                other = rng.choice(seeds)
                buf[where:] = other[rng.randint(0, len(other)) :]
    return bytes(buf[:65536])


def _random_loop(iterations: int, seed: int, corpus: Path) -> int:
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()] or [b""]
    rng = random.Random(seed)
    for seed_input in seeds:
        fuzz_one(seed_input)
    for i in range(1, iterations + 1):
        candidate = mutate(rng.choice(seeds), seeds, rng)
        try:
            fuzz_one(candidate)
        except Exception:
            name = Path.cwd() / f"crash-{hashlib.sha1(candidate).hexdigest()[:12]}"
            name.write_bytes(candidate)
            print(f"crash after {i} inputs; input saved to {name}", file=sys.stderr)
            raise
        if i % 10_000 == 0:
            print(f"{i} inputs, no crash", file=sys.stderr)
    print(f"{iterations} mutated inputs from {len(seeds)} seeds: no crash")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
        parser.add_argument("-n", "--iterations", type=int, default=100_000)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--corpus", type=Path, default=CORPUS)
        args = parser.parse_args(argv[1:])
        return _random_loop(args.iterations, args.seed, args.corpus)
    atheris.instrument_all()
    atheris.Setup(argv, fuzz_one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
