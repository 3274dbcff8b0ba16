"""Faults during traffic, with the accounting of ``helpers.account`` after each.

Concurrent raw SMTP senders keep the real server busy while the test breaks what it
depends on: the embedded store's disk fills up; PostgreSQL connections are terminated;
PostgreSQL goes away and comes back (a TCP proxy in front of the shared server that the
test stops and starts, since the shared server itself must never be stopped); the
notification API is down, then hangs; clients hang up mid-DATA or right after the final
dot; the process gets SIGTERM mid-transaction. Whatever happens, clients see 250 or a
4xx, the server logs no traceback, and the store holds every committed message exactly
once with all its rows and nothing else.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from relate_smtp.storage.postgres import open_postgres_store
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import DB_NAME, ServeProcess, free_port, make_settings, running_server
from tests.robustness.helpers import (
    ORPHANS_QUERY,
    STORED_QUERY,
    CommitRecorder,
    Ledger,
    Peer,
    PeerClosed,
    Progress,
    TcpProxy,
    Traffic,
    account,
    capture_logs,
    dot_stuffed,
    group_stored,
    message_bytes,
    send_message,
    sender,
    sqlite_stored,
    unique_id,
)
from tests.storage.helpers import TempDatabase, temporary_database

needs_postgres = pytest.mark.usefixtures("postgres_available")

LOCAL = "rcpt@example.com"
REMOTE = "someone@remote.example"
OPEN_SUBMISSION = "Smtp:RequireAuthentication=false"
FAST_CLOCKS = (
    "Smtp:CommandTimeoutSeconds=5",
    "Smtp:DataTimeoutSeconds=5",
    "Smtp:ShutdownTimeoutSeconds=3",
)
TO_LOCAL_AND_REMOTE = Traffic(to=(LOCAL,), cc=(REMOTE,), rows=2, attachment=4096)


def start_senders(
    nursery: trio.Nursery,
    port: int,
    count: int,
    traffic: Traffic,
    ledger: Ledger,
    progress: Progress,
    sizes: dict[str, int] | None = None,
) -> None:
    for n in range(count):
        nursery.start_soon(
            functools.partial(
                sender, port, f"s{n}", traffic, ledger, progress, attachment_sizes=sizes
            )
        )


# --------------------------------------------------------------------------- disk full


@attrs.define
class Disk:
    """How many pages the embedded store may grow to; None = unlimited.

    Applied by :class:`LimitedConnection` at the start of every transaction, in the
    thread that owns the connection, so SQLite itself fails the write with
    ``SQLITE_FULL`` ("database or disk is full"), exactly as on a full disk.
    """

    pages: int | None = None


DISK = Disk()
UNLIMITED_PAGES = 1_073_741_823


class LimitedConnection(sqlite3.Connection):
    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if sql.startswith("BEGIN"):
            limit = DISK.pages if DISK.pages is not None else UNLIMITED_PAGES
            super().execute(f"PRAGMA max_page_count = {limit}")
        return super().execute(sql, parameters)


@pytest.fixture
def small_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    connect = sqlite3.connect

    def limited(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", LimitedConnection)
        conn: sqlite3.Connection = connect(*args, **kwargs)
        return conn

    monkeypatch.setattr(sqlite3, "connect", limited)
    DISK.pages = None
    yield DISK
    DISK.pages = None


def page_count(path: Path) -> int:
    with sqlite3.connect(str(path)) as conn:
        return int(conn.execute("PRAGMA page_count").fetchone()[0])


async def test_disk_full_on_the_embedded_store(
    tmp_path: Path, db_path: Path, small_disk: Disk, store: SqliteStore
) -> None:
    """The disk fills up mid-traffic: messages get 451 4.3.0 and leave no rows; once
    space is freed the same sessions deliver again, without a restart."""
    await store.create_user(LOCAL, display_name=None, aliases=())
    ledger, progress, sizes = Ledger(), Progress(), dict[str, int]()
    traffic = attrs.evolve(TO_LOCAL_AND_REMOTE, count=40, attachment=64 * 1024)
    phases: list[Counter[int]] = []
    with capture_logs() as logs:
        async with running_server(
            make_settings(tmp_path, OPEN_SUBMISSION, *FAST_CLOCKS),
            store,
            new_mail_listener=CommitRecorder(ledger),
        ) as running:
            port = running.port("submission")
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    start_senders(nursery, port, 4, traffic, ledger, progress, sizes)
                    await progress.reached(20)
                    small_disk.pages = page_count(db_path) + 40  # ~160 KiB left
                    await progress.reached(100)
                    phases.append(ledger.codes.copy())
                    small_disk.pages = None  # space freed
    full_phase = phases[0]
    after = ledger.codes - full_phase
    assert set(ledger.codes) <= {250, 451}, ledger.codes
    assert full_phase[451] >= 20, full_phase  # the disk was full for a while
    # ...and then recovered. A commit already failing in the store's thread when space
    # was freed is answered after the snapshot: at most one per sender.
    assert after[250] >= 40 and after[451] <= 4, after
    assert logs.problems() == []
    assert any("database or disk is full" in m for m in logs.messages())

    stored, orphans = sqlite_stored(str(db_path))
    assert orphans == 0
    figures = account(ledger, stored, attachment_bytes=sizes)
    assert figures.refused == ledger.codes[451]
    print(f"disk full: {figures.line()}")


# --------------------------------------------------------------------------- clients


async def test_clients_hanging_up_mid_data_and_after_the_dot(
    tmp_path: Path, db_path: Path, store: SqliteStore
) -> None:
    """Among normal senders, 60 clients vanish mid-DATA (half with a FIN, half with a
    reset) and 20 right after the final dot, before reading the reply: nothing of the
    first kind is stored; of the second kind, what was committed is stored once (a
    missed 250 is allowed, a duplicate or a partial message is not)."""
    ledger, progress = Ledger(), Progress()
    with capture_logs() as logs:
        async with running_server(
            make_settings(tmp_path, OPEN_SUBMISSION, *FAST_CLOCKS),
            store,
            new_mail_listener=CommitRecorder(ledger),
        ) as running:
            port = running.port("submission")
            ports: list[int] = []

            async def vanish(n: int, when: str) -> None:
                peer = await Peer.connect(port)
                ports.append(peer.local_port)
                message_id = unique_id(f"vanish-{when}-{n}")
                data = dot_stuffed(message_bytes(message_id, to=[LOCAL], attachment=8192))
                await peer.send(
                    f"EHLO v\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<{LOCAL}>\r\nDATA\r\n".encode()
                )
                assert await peer.replies(4) == [250, 250, 250, 354]
                if when == "mid-data":
                    await peer.send(data[: len(data) // 2])
                    ledger.record(message_id, "not sent")
                else:
                    await peer.send(data)
                    ledger.record(message_id, "unknown")
                if n % 2:
                    await peer.reset()
                else:
                    await peer.aclose()

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    start_senders(
                        nursery, port, 4, Traffic(to=(LOCAL,), count=25, rows=1), ledger, progress
                    )
                    for n in range(60):
                        nursery.start_soon(vanish, n, "mid-data")
                    for n in range(20):
                        nursery.start_soon(vanish, n, "after-dot")
                await logs.sessions_ended(ports)

    assert logs.problems() == []
    stored, orphans = sqlite_stored(str(db_path))
    assert orphans == 0
    figures = account(ledger, stored)
    assert figures.accepted == 100
    mid_data = {m for m in ledger.told if "-mid-data-" in m}
    assert not mid_data & set(stored)
    print(f"hang-ups: {figures.line()}")


# --------------------------------------------------------------------------- notification


@attrs.define
class FakeApi:
    """The Relate API's notification endpoint: ``mode`` is ``"hang"`` (read the request,
    never answer) or ``"ok"`` (204). Not listening at all is the API being down."""

    mode: str = "hang"
    posted: Counter[str] = attrs.field(factory=Counter)  # email id -> POSTs received
    users: set[str] = attrs.field(factory=set)  # every userIds entry received

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                match = re.search(rb"(?i)content-length: *(\d+)", head)
                length = int(match.group(1)) if match else 0
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                payload = json.loads(body)
                self.posted[payload["email"]["id"]] += 1
                self.users.update(payload["userIds"])
                if self.mode == "hang":
                    await trio.sleep_forever()
                await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def test_notification_api_down_then_hanging(
    tmp_path: Path, db_path: Path, store: SqliteStore
) -> None:
    """The API is down (connection refused), then accepts and never answers. The 250
    never waits for it, no notification is posted twice, failures are warnings, and
    shutdown is not held up beyond Smtp:ShutdownTimeoutSeconds."""
    user = await store.create_user(LOCAL, display_name=None, aliases=())
    api_port = free_port()
    settings = make_settings(
        tmp_path,
        OPEN_SUBMISSION,
        *FAST_CLOCKS,
        f"Api:BaseUrl=http://127.0.0.1:{api_port}",
        "Api:TimeoutSeconds=0.5",
    )
    ledger, progress = Ledger(), Progress()
    api = FakeApi()
    recorder = CommitRecorder(ledger)
    latencies: list[float] = []
    with capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as outer:
            async with running_server(settings, store, new_mail_listener=recorder) as running:
                recorder.forward = running.server.notifier
                port = running.port("submission")

                async def timed_sender(tag: str, count: int) -> None:
                    peer = await Peer.connect(port)
                    await peer.command(b"EHLO n.example")
                    for n in range(count):
                        message_id = unique_id(f"{tag}-{n}")
                        ledger.rows[message_id] = 1
                        await peer.send(
                            f"MAIL FROM:<a@b.example>\r\nRCPT TO:<{LOCAL}>\r\nDATA\r\n".encode()
                        )
                        assert await peer.replies(3) == [250, 250, 354]
                        await peer.send(dot_stuffed(message_bytes(message_id, to=[LOCAL])))
                        started = time.monotonic()
                        reply = await peer.reply()
                        latencies.append(time.monotonic() - started)
                        ledger.record(
                            message_id, "accepted" if reply.code == 250 else "refused", reply.code
                        )
                        progress.record()
                    await peer.aclose()

                # Down: nothing listens on the API port.
                await timed_sender("down", 3)
                await logs.wait_for(r"notification for email .* failed after 3 attempt")
                # Hanging: it accepts, reads, never answers.
                listeners = await trio.open_tcp_listeners(api_port, host="127.0.0.1")
                await outer.start(trio.serve_listeners, api.handle, listeners)
                async with trio.open_nursery() as nursery:
                    for t in range(3):
                        nursery.start_soon(timed_sender, f"hang{t}", 5)
                await logs.wait_for(r"did not answer the notification")
                shutdown_started = time.monotonic()
            shutdown = time.monotonic() - shutdown_started
            outer.cancel_scope.cancel()

    assert ledger.codes == Counter({250: 18})
    assert max(latencies) < 0.5, max(latencies)  # below Api:TimeoutSeconds: never waited
    assert shutdown < 3 + 1.5, shutdown  # Smtp:ShutdownTimeoutSeconds=3 bounds the drain
    assert api.posted and max(api.posted.values()) == 1, api.posted  # never twice
    assert logs.problems() == []
    assert any("not delivered within" in m for m in logs.messages())
    stored, orphans = sqlite_stored(str(db_path))
    assert orphans == 0
    figures = account(ledger, stored)
    assert figures.stored == 18
    assert api.users == {str(user.id)}
    print(f"notification api: {figures.line()} posts={sum(api.posted.values())}")


# --------------------------------------------------------------------------- PostgreSQL


async def pg_stored(db: TempDatabase) -> tuple[dict[str, list[Any]], int]:
    rows = await db.fetch(STORED_QUERY)
    orphans = int(await db.fetchval(ORPHANS_QUERY))
    return group_stored(tuple(row) for row in rows), orphans


@pytest.mark.postgres
@needs_postgres
async def test_postgres_connections_terminated_during_traffic(tmp_path: Path) -> None:
    async with temporary_database("init") as db, open_postgres_store(db.params) as store:
        await store.create_user(LOCAL, display_name=None, aliases=())
        ledger, progress, sizes = Ledger(), Progress(), dict[str, int]()
        killed = 0
        with capture_logs() as logs:
            async with running_server(
                make_settings(tmp_path, OPEN_SUBMISSION, *FAST_CLOCKS),
                store,
                new_mail_listener=CommitRecorder(ledger),
            ) as running:
                port = running.port("submission")
                with trio.fail_after(90):
                    async with trio.open_nursery() as nursery:
                        start_senders(
                            nursery,
                            port,
                            6,
                            attrs.evolve(TO_LOCAL_AND_REMOTE, count=30),
                            ledger,
                            progress,
                            sizes,
                        )
                        for threshold in (20, 50, 80, 110, 140):
                            await progress.reached(threshold)
                            killed += await db.terminate_connections(
                                db.params.application_name or ""
                            )
        stored, orphans = await pg_stored(db)
    assert killed >= 3
    assert set(ledger.codes) <= {250, 451}, ledger.codes
    assert logs.problems() == []
    assert orphans == 0
    figures = account(ledger, stored, attachment_bytes=sizes, ambiguous_commits_allowed=True)
    print(f"pg_terminate_backend x{killed}: {figures.line()}")


@pytest.mark.postgres
@needs_postgres
async def test_postgres_stopped_and_restarted(tmp_path: Path) -> None:
    """PostgreSQL goes away (every connection cut, new ones refused) and comes back on
    the same address, twice; then the network to it turns into a black hole for a while
    (Command Timeout=2 bounds each wait). Messages meanwhile get 451, and delivery
    resumes on its own, in the same SMTP sessions."""
    async with (
        temporary_database("init") as db,
        TcpProxy(db.params.host or "127.0.0.1", db.params.port).running() as proxy,
    ):
        params = attrs.evolve(
            db.params, host="127.0.0.1", port=proxy.port, connect_timeout=2.0, command_timeout=2.0
        )
        async with open_postgres_store(params) as store:
            await store.create_user(LOCAL, display_name=None, aliases=())
            ledger, progress, sizes = Ledger(), Progress(), dict[str, int]()
            outages: list[Counter[int]] = []
            with capture_logs() as logs:
                async with running_server(
                    make_settings(tmp_path, OPEN_SUBMISSION, *FAST_CLOCKS),
                    store,
                    new_mail_listener=CommitRecorder(ledger),
                ) as running:
                    port = running.port("submission")
                    with trio.fail_after(90):
                        async with trio.open_nursery() as nursery:
                            start_senders(
                                nursery,
                                port,
                                6,
                                attrs.evolve(TO_LOCAL_AND_REMOTE, count=50),
                                ledger,
                                progress,
                                sizes,
                            )
                            for down, up in ((30, 70), (120, 160)):
                                await progress.reached(down)
                                before = ledger.codes.copy()
                                proxy.stop()
                                await progress.reached(up)
                                outages.append(ledger.codes - before)
                                await proxy.start()
                            await progress.reached(190)
                            before = ledger.codes.copy()
                            proxy.freeze()
                            await progress.reached(200)
                            partition = ledger.codes - before
                            proxy.thaw()
            stored, orphans = await pg_stored(db)
    assert set(ledger.codes) <= {250, 451}, ledger.codes
    for outage in outages:
        assert outage[451] >= 20, outages  # most of each outage's messages were refused
    assert partition[451] >= 6, partition  # the black hole failed a whole batch
    assert ledger.codes[250] >= 60, ledger.codes  # and the rest went in
    assert logs.problems() == []
    assert orphans == 0
    figures = account(ledger, stored, attachment_bytes=sizes, ambiguous_commits_allowed=True)
    print(f"postgres stopped/restarted x2, partitioned x1: {figures.line()}")


@pytest.mark.postgres
@needs_postgres
async def test_a_commit_whose_answer_is_lost_is_not_refused(tmp_path: Path) -> None:
    """The batch statement reaches PostgreSQL and commits; the answer never comes back
    and the connection then drops. The store cannot tell success from failure from the
    connection alone, but it knows the rows' ids: a message told 451 must not be stored
    (or it must be told 250)."""
    async with (
        temporary_database("init") as db,
        TcpProxy(db.params.host or "127.0.0.1", db.params.port).running() as proxy,
    ):
        params = attrs.evolve(db.params, host="127.0.0.1", port=proxy.port, connect_timeout=2.0)
        async with open_postgres_store(params) as store:
            await store.create_user(LOCAL, display_name=None, aliases=())
            ledger = Ledger()
            async with running_server(
                make_settings(tmp_path, OPEN_SUBMISSION, *FAST_CLOCKS),
                store,
                new_mail_listener=CommitRecorder(ledger),
            ) as running:
                port = running.port("submission")
                with trio.fail_after(30):
                    peer = await Peer.connect(port)
                    await peer.command(b"EHLO lost.example")
                    warm_up = unique_id("warm-up")
                    first = await send_message(
                        peer, warm_up, message_bytes(warm_up, to=[LOCAL]), recipients=[LOCAL]
                    )
                    assert first.outcome == "accepted"  # the pool holds a connection now
                    proxy.mute()
                    message_id = unique_id("lost-answer")
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            functools.partial(
                                send_message,
                                peer,
                                message_id,
                                message_bytes(message_id, to=[LOCAL]),
                                recipients=[LOCAL],
                                ledger=ledger,
                            )
                        )
                        # PostgreSQL cannot tell us when the row is committed: poll.
                        while not await db.fetchval(  # noqa: ASYNC110
                            'SELECT count(*) FROM "Emails" WHERE "MessageId" = $1', message_id
                        ):
                            await trio.sleep(0.02)
                        # The connection drops and the database is reachable again:
                        # the store can ask which messages of the batch were stored.
                        proxy.cut()
                        proxy.unmute()
                    await peer.aclose()
            stored, _ = await pg_stored(db)
    assert message_id in stored
    assert ledger.told[message_id] == "accepted", ledger.codes


# --------------------------------------------------------------------------- SIGTERM


async def test_sigterm_mid_transaction(tmp_path: Path) -> None:
    """``relate-smtp serve`` gets SIGTERM while senders are busy and four clients are
    half-way through DATA. Those four finish and get 250 then 421; the others get 421
    or finish their message; the process exits 0; every 250 is stored, nothing else."""
    server = ServeProcess(
        tmp_path,
        f"--Storage:SqlitePath={DB_NAME}",
        OPEN_SUBMISSION.replace("Smtp:", "--Smtp:"),
        "--Smtp:ShutdownTimeoutSeconds=10",
        "--Logging:LogLevel:Default=Information",
    )
    try:
        await trio.to_thread.run_sync(server.wait_listening, {"submission"})
        port = server.ports["submission"]
        ledger, progress = Ledger(), Progress()
        halfway = Progress()
        signalled = trio.Event()

        async def in_flight(n: int) -> None:
            peer = await Peer.connect(port)
            message_id = unique_id(f"in-flight-{n}")
            data = dot_stuffed(message_bytes(message_id, to=[LOCAL], attachment=4096))
            await peer.send(
                f"EHLO f\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<{LOCAL}>\r\nDATA\r\n".encode()
            )
            assert await peer.replies(4) == [250, 250, 250, 354]
            await peer.send(data[:1000])
            halfway.record()
            await signalled.wait()
            await peer.send(data[1000:])
            reply = await peer.reply()
            ledger.record(message_id, "accepted" if reply.code == 250 else "refused", reply.code)
            assert reply.code == 250, reply
            assert (await peer.reply()).code == 421
            with pytest.raises(PeerClosed):
                await peer.reply()
            await peer.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                start_senders(nursery, port, 6, Traffic(to=(LOCAL,), count=1000), ledger, progress)
                for n in range(4):
                    nursery.start_soon(in_flight, n)
                await progress.reached(60)
                await halfway.reached(4)
                server.signal(signal.SIGTERM)
                signalled.set()
            code = await trio.to_thread.run_sync(server.wait_exit, 30.0)
    finally:
        server.kill()
    assert code == 0, server.log
    assert "Traceback" not in server.log, server.log
    assert " ERROR " not in server.log and " CRITICAL " not in server.log, server.log
    stored, orphans = sqlite_stored(str(tmp_path / DB_NAME))
    assert orphans == 0
    # The server's side of the count: the messages its session summaries report.
    told_250 = sum(int(m) for m in re.findall(r" messages=(\d+) ", server.log))
    figures = account(ledger, stored, commits_observed=False)
    assert figures.stored == told_250 >= figures.accepted >= 60
    assert ledger.codes[421] + len(ledger.ids("not sent")) >= 1  # the senders were cut
    print(f"SIGTERM mid-transaction: {figures.line()} server-reported={told_250}")
