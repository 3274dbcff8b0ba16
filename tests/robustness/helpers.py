"""Shared pieces of the robustness suite: a raw SMTP peer, message accounting on both
sides, log capture, and a controllable TCP proxy for database outages.

Accounting follows the issue's rule. Each message carries a unique Message-ID; the
client records what it was told (250, a refusal, or nothing because the connection was
lost after the final dot), the server side records what the delivery handler saw
committed (its ``NewMailListener``), and the store is read back at the end. Then:
every stored message is stored once with all its rows; every 250 was committed; every
commit is stored; nothing refused is stored unless the server could not know the
outcome of its commit (a database connection lost after PostgreSQL committed).
"""

from __future__ import annotations

import email.policy
import logging
import re
import socket
import sqlite3
import struct
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from email.message import EmailMessage
from typing import Literal

import attrs
import trio

from relate_smtp.handlers.delivery import NewMailListener
from relate_smtp.storage import NewEmail, SavedEmail

REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
ATTACHMENT_NAME = "payload.bin"

# --------------------------------------------------------------------------- raw peer


class PeerClosed(Exception):
    """The server closed (or reset) the connection."""


@attrs.frozen
class ReplyLine:
    code: int
    text: str


class Peer:
    """One SMTP client connection that sends exactly the bytes it is given."""

    def __init__(self, stream: trio.abc.Stream, *, local_port: int = 0) -> None:
        self.stream = stream
        self.local_port = local_port
        self._buffer = bytearray()
        self._eof = False

    @classmethod
    async def connect(cls, port: int, *, greeting: bool = True) -> Peer:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        peer = cls(stream, local_port=int(stream.socket.getsockname()[1]))
        if greeting:
            reply = await peer.reply()
            assert reply.code == 220, reply
        return peer

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, *, timeout: float = 10.0) -> ReplyLine:  # noqa: ASYNC109
        """The next reply (its last line for a multi-line one); PeerClosed at EOF."""
        with trio.fail_after(timeout):
            while True:
                line = await self._line()
                match = REPLY_LINE.match(line)
                assert match is not None, f"not an SMTP reply line: {line[:200]!r}"
                if match.group(2) == b" ":
                    return ReplyLine(int(match.group(1)), match.group(3).decode(errors="replace"))

    async def command(self, line: bytes, *, timeout: float = 10.0) -> ReplyLine:  # noqa: ASYNC109
        await self.send(line + b"\r\n")
        return await self.reply(timeout=timeout)

    async def replies(self, count: int, *, timeout: float = 10.0) -> list[int]:  # noqa: ASYNC109
        """The codes of the next ``count`` replies (fewer when the server closes)."""
        codes: list[int] = []
        with trio.fail_after(timeout):
            for _ in range(count):
                try:
                    codes.append((await self.reply()).code)
                except PeerClosed:
                    break
        return codes

    async def until_closed(self, *, timeout: float) -> list[int]:  # noqa: ASYNC109
        """Every reply until the server closes; fails when it does not close in time."""
        codes: list[int] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    codes.append((await self.reply(timeout=timeout)).code)
                except PeerClosed:
                    return codes

    async def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if self._eof:
                raise PeerClosed(bytes(self._buffer))
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""  # reset by the server
            if not data:
                self._eof = True
            self._buffer += data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing client does."""
        assert isinstance(self.stream, trio.SocketStream)
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose()


# --------------------------------------------------------------------------- messages

SENDER = "sender@sender.example"


def unique_id(tag: str) -> str:
    """A Message-ID no other message has: ``<tag>-<uuid>@robust.example``."""
    safe = re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-")
    return f"{safe}-{uuid.uuid4().hex}@robust.example"


def message_bytes(
    message_id: str,
    *,
    to: Sequence[str],
    cc: Sequence[str] = (),
    attachment: int = 0,
    body: str = "robustness\n",
) -> bytes:
    """An RFC 5322 message with CRLF line ends; ``attachment`` octets attached."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f"Sender <{SENDER}>"
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = f"robustness {message_id[:12]}"
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(body)
    if attachment:
        msg.add_attachment(
            _filler(attachment),
            maintype="application",
            subtype="octet-stream",
            filename=ATTACHMENT_NAME,
        )
    return msg.as_bytes()


def _filler(size: int) -> bytes:
    return (uuid.uuid4().bytes * (size // 16 + 1))[:size]


def dot_stuffed(data: bytes) -> bytes:
    """DATA's transparency (RFC 5321 §4.5.2) plus the terminating CRLF.CRLF."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


Outcome = Literal["accepted", "refused", "unknown", "not sent"]


@attrs.define
class Ledger:
    """What the clients were told, per Message-ID, and what the server committed."""

    told: dict[str, Outcome] = attrs.field(factory=dict)
    codes: Counter[int] = attrs.field(factory=Counter)
    committed: Counter[str] = attrs.field(factory=Counter)
    rows: dict[str, int] = attrs.field(factory=dict)  # expected recipient rows per id

    def record(self, message_id: str, outcome: Outcome, code: int | None = None) -> None:
        self.told[message_id] = outcome
        if code is not None:
            self.codes[code] += 1

    def ids(self, outcome: Outcome) -> set[str]:
        return {m for m, o in self.told.items() if o == outcome}


class CommitRecorder:
    """The server's side of the count: every message the delivery handler committed.

    ``forward`` also hands each message on (to the real notifier, say).
    """

    def __init__(self, ledger: Ledger, forward: NewMailListener | None = None) -> None:
        self._ledger = ledger
        self.forward = forward

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None:
        self._ledger.committed[email.message_id] += 1
        if self.forward is not None:
            self.forward.message_stored(email, saved)


@attrs.frozen
class StoredMessage:
    recipients: int
    attachments: int
    attachment_bytes: int


@attrs.frozen
class Accounting:
    sent: int
    accepted: int
    refused: int
    unknown: int
    committed: int
    stored: int
    stored_without_commit: int  # the server could not know its commit succeeded

    def line(self) -> str:
        return (
            f"sent={self.sent} accepted={self.accepted} refused={self.refused}"
            f" unknown={self.unknown} committed={self.committed} stored={self.stored}"
            f" stored-without-known-commit={self.stored_without_commit}"
        )


def account(
    ledger: Ledger,
    stored: Mapping[str, list[StoredMessage]],
    *,
    attachment_bytes: Mapping[str, int] | None = None,
    ambiguous_commits_allowed: bool = False,
    commits_observed: bool = True,
) -> Accounting:
    """Check the issue's invariants for the ids this ledger sent; return the figures.

    ``commits_observed=False``: the server ran in another process, so only the client
    side and the store are compared. ``stored`` maps Message-ID to its stored copies;
    ids this ledger neither sent nor saw committed are ignored here (the caller decides
    whether they may exist).
    """
    ours = set(ledger.told) | set(ledger.committed)
    mine = {m: copies for m, copies in stored.items() if m in ours}
    for message_id, copies in mine.items():
        assert len(copies) == 1, f"{message_id} stored {len(copies)} times"
        (copy,) = copies
        expected_rows = ledger.rows.get(message_id)
        if expected_rows is not None:
            assert copy.recipients == expected_rows, (message_id, copy)
        if attachment_bytes is not None and message_id in attachment_bytes:
            size = attachment_bytes[message_id]
            assert (copy.attachments, copy.attachment_bytes) == ((1, size) if size else (0, 0))
    for message_id, count in ledger.committed.items():
        assert count == 1, f"{message_id} committed {count} times"
        assert message_id in mine, f"{message_id} committed but not stored"
    accepted = ledger.ids("accepted")
    refused = ledger.ids("refused")
    missing = accepted - set(mine)
    assert not missing, f"told 250 but not stored: {sorted(missing)[:5]}"
    refused_but_stored = refused & set(mine)
    without_commit = set(mine) - set(ledger.committed)
    if not commits_observed:
        assert not refused_but_stored, f"refused yet stored: {sorted(refused_but_stored)[:5]}"
        without_commit = set()
    elif ambiguous_commits_allowed:
        assert refused_but_stored <= without_commit, sorted(refused_but_stored)[:5]
    else:
        assert accepted <= set(ledger.committed), sorted(accepted - set(ledger.committed))[:5]
        assert not refused_but_stored, f"refused yet stored: {sorted(refused_but_stored)[:5]}"
        assert not without_commit, f"stored but never committed: {sorted(without_commit)[:5]}"
    return Accounting(
        sent=len(ledger.told) - len(ledger.ids("not sent")),
        accepted=len(accepted),
        refused=len(refused),
        unknown=len(ledger.ids("unknown")),
        committed=len(ledger.committed),
        stored=len(mine),
        stored_without_commit=len(without_commit),
    )


STORED_QUERY = (
    'SELECT e."MessageId",'
    ' (SELECT count(*) FROM "EmailRecipients" r WHERE r."EmailId" = e."Id"),'
    ' (SELECT count(*) FROM "EmailAttachments" a WHERE a."EmailId" = e."Id"),'
    ' (SELECT coalesce(sum(a."SizeBytes"), 0) FROM "EmailAttachments" a'
    '   WHERE a."EmailId" = e."Id")'
    ' FROM "Emails" e'
)
ORPHANS_QUERY = (
    'SELECT (SELECT count(*) FROM "EmailRecipients" r'
    '  WHERE NOT EXISTS (SELECT 1 FROM "Emails" e WHERE e."Id" = r."EmailId"))'
    ' + (SELECT count(*) FROM "EmailAttachments" a'
    '  WHERE NOT EXISTS (SELECT 1 FROM "Emails" e WHERE e."Id" = a."EmailId"))'
)


def group_stored(rows: Iterable[Sequence[object]]) -> dict[str, list[StoredMessage]]:
    stored: dict[str, list[StoredMessage]] = {}
    for message_id, recipients, attachments, size in rows:
        copy = StoredMessage(int(recipients), int(attachments), int(size))  # type: ignore[call-overload]
        stored.setdefault(str(message_id), []).append(copy)
    return stored


def sqlite_stored(path: str) -> tuple[dict[str, list[StoredMessage]], int]:
    """(stored messages by Message-ID, orphaned rows) in a SQLite store file."""
    with sqlite3.connect(path) as conn:
        stored = group_stored(conn.execute(STORED_QUERY))
        (orphans,) = conn.execute(ORPHANS_QUERY).fetchone()
    return stored, int(orphans)


# --------------------------------------------------------------------------- sending


@attrs.frozen
class Sent:
    outcome: Outcome
    code: int | None


async def send_message(
    peer: Peer,
    message_id: str,
    data: bytes,
    *,
    recipients: Sequence[str],
    ledger: Ledger | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> Sent:
    """One pipelined transaction (MAIL, RCPTs, DATA in one write, then the body).

    The outcome is ``unknown`` when the connection is lost after the final dot and
    before its reply, ``not sent`` when it was refused or lost before the body went.
    """
    envelope = b"".join(
        [f"MAIL FROM:<{SENDER}>\r\n".encode()]
        + [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
        + [b"DATA\r\n"]
    )
    result = Sent("not sent", None)
    try:
        with trio.fail_after(timeout):
            await peer.send(envelope)
            # The outer deadline bounds every reply: a hostile message may take the
            # server longer than a reply's default to refuse.
            codes = [(await peer.reply(timeout=timeout)).code for _ in range(len(recipients) + 2)]
            if codes[-1] != 354:
                refusal = next(c for c in codes if c >= 400)
                result = Sent("refused", refusal)
            else:
                await peer.send(dot_stuffed(data))
                result = Sent("unknown", None)
                final = (await peer.reply(timeout=timeout)).code
                result = Sent("accepted" if final == 250 else "refused", final)
    except (PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if ledger is not None and (result.outcome != "not sent" or message_id not in ledger.told):
        ledger.record(message_id, result.outcome, result.code)
    return result


async def normal_session(port: int, ledger: Ledger, *, to: str = "rcpt@example.com") -> None:
    """A well-behaved client: EHLO, one message, QUIT; asserts every step succeeds."""
    with trio.fail_after(10):
        peer = await Peer.connect(port)
        try:
            assert (await peer.command(b"EHLO normal.example")).code == 250
            message_id = unique_id("normal")
            ledger.rows[message_id] = 1
            sent = await send_message(
                peer, message_id, message_bytes(message_id, to=[to]), recipients=[to], ledger=ledger
            )
            assert sent.outcome == "accepted", sent
            assert (await peer.command(b"QUIT")).code == 221
        finally:
            await peer.aclose()


# --------------------------------------------------------------------------- logs


class LogCapture(logging.Handler):
    """Every record of the ``relate_smtp`` loggers while installed; ``wait_for`` wakes
    on new records (also those emitted from worker threads), no polling."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if threading.get_ident() == self._thread:
            self._changed.set()
        else:
            self._token.run_sync_soon(self._changed.set)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def problems(self) -> list[str]:
        """Records that betray a bug: ERROR or worse, a traceback, exception info."""
        found = []
        for record in self.records:
            text = record.getMessage()
            if record.levelno >= logging.ERROR or record.exc_info or "Traceback" in text:
                found.append(f"{record.levelname} {record.name}: {text}")
        return found

    def summaries(self, port: int) -> list[str]:
        """The session summary lines of the client that used ``port``."""
        return [m for m in self.messages() if SUMMARY.match(m) and f":{port} " in m]

    async def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while len(found := [m for m in self.messages() if regex.search(m)]) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        return found

    async def sessions_ended(self, ports: Iterable[int], *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every client port has its session summary line."""
        for port in ports:
            await self.wait_for(rf"^session 127\.0\.0\.1:{port} ", timeout=timeout)


SUMMARY = re.compile(r"^session \S+:\d+ listener=")


@contextmanager
def capture_logs(name: str = "relate_smtp") -> Iterator[LogCapture]:
    logger = logging.getLogger(name)
    capture = LogCapture()
    old_level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)


# --------------------------------------------------------------------------- TCP proxy


class TcpProxy:
    """A TCP proxy to ``target`` that the test can stop (refuse and cut every
    connection, as a database that went down) and start again on the same port.

    ``freeze()`` keeps connections open but stops forwarding, as a network partition;
    ``mute()`` forwards requests but drops every answer (the database acts on them, and
    the client never hears back).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._running = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._listening: trio.CancelScope | None = None
        self._frozen = trio.Event()
        self._frozen.set()  # set = flowing
        self._connections: set[trio.CancelScope] = set()
        self._muted = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TcpProxy]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.start()
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def start(self) -> None:
        assert self._nursery is not None and self._listening is None
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        scope = trio.CancelScope()
        self._listening = scope

        async def serve() -> None:
            with scope:
                await trio.serve_listeners(self._relay, listeners, handler_nursery=self._nursery)

        self._nursery.start_soon(serve)

    def stop(self) -> None:
        """Close the listening socket (connections refused) and cut every connection."""
        assert self._listening is not None
        self._listening.cancel()
        self._listening = None
        for connection in list(self._connections):
            connection.cancel()

    def cut(self) -> None:
        """Cut every open connection, keep accepting new ones."""
        for connection in list(self._connections):
            connection.cancel()

    def freeze(self) -> None:
        self._frozen = trio.Event()

    def thaw(self) -> None:
        self._frozen.set()

    def mute(self) -> None:
        self._muted = True

    def unmute(self) -> None:
        self._muted = False

    async def _relay(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        upstream: trio.SocketStream | None = None
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                upstream = await trio.open_tcp_stream(*self._target)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope, True)
            except OSError:
                pass
            finally:
                self._connections.discard(scope)
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(downstream)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        both: trio.CancelScope,
        answers: bool = False,
    ) -> None:
        """Copy one direction; when it ends, end the other too."""
        try:
            while data := await source.receive_some(65536):
                await self._frozen.wait()
                if not (answers and self._muted):
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()


# --------------------------------------------------------------------------- traffic


@attrs.define
class Progress:
    """Messages answered so far (any outcome); waitable by threshold."""

    answered: int = 0
    _waiting: list[tuple[int, trio.Event]] = attrs.field(factory=list)

    def record(self) -> None:
        self.answered += 1
        for threshold, event in self._waiting:
            if self.answered >= threshold:
                event.set()

    async def reached(self, threshold: int) -> None:
        if self.answered < threshold:
            event = trio.Event()
            self._waiting.append((threshold, event))
            await event.wait()


@attrs.frozen(kw_only=True)
class Traffic:
    """What one sender sends: ``count`` messages, each to ``to`` plus ``cc`` (header
    and envelope), every other one with an attachment of ``attachment`` octets."""

    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    count: int = 20
    attachment: int = 0
    rows: int | None = None  # recipient rows each stored copy must have

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.to + self.cc


async def sender(
    port: int,
    tag: str,
    traffic: Traffic,
    ledger: Ledger,
    progress: Progress,
    *,
    attachment_sizes: dict[str, int] | None = None,
) -> None:
    """Send ``traffic.count`` messages over as few sessions as the server allows: a
    session lost (or closed with 421) is reopened, until the server refuses to connect.
    """
    sent = 0
    while sent < traffic.count:
        try:
            peer = await Peer.connect(port)
        except (OSError, PeerClosed, AssertionError):
            break  # the server is gone (shut down)
        try:
            if (await peer.command(b"EHLO traffic.example")).code != 250:
                break
            while sent < traffic.count:
                message_id = unique_id(f"{tag}-{sent}")
                size = traffic.attachment if sent % 2 else 0
                if attachment_sizes is not None:
                    attachment_sizes[message_id] = size
                if traffic.rows is not None:
                    ledger.rows[message_id] = traffic.rows
                data = message_bytes(message_id, to=traffic.to, cc=traffic.cc, attachment=size)
                result = await send_message(
                    peer, message_id, data, recipients=traffic.recipients, ledger=ledger
                )
                sent += 1
                progress.record()
                if result.outcome in ("unknown", "not sent") or result.code == 421:
                    break  # the session is over: open another
        except (PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await peer.aclose()
