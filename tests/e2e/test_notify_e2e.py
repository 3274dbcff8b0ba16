"""The new-mail notification (SPEC §6) as a real HTTP request to a local sink."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import attrs
import h11
import trio

from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    add_account,
    client,
    free_port,
    in_thread,
    make_settings,
    running_server,
    watch_log,
)

API_KEY = "internal-test-key"
API_TIMEOUT = 5.0


@attrs.define
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@attrs.define
class Sink:
    """A tiny HTTP API on 127.0.0.1: answers 200, or (``hang``) reads and never answers."""

    port: int
    hang: bool
    gate: trio.Event | None = None
    """When set, each answer waits for this event."""
    requests: list[Received] = attrs.field(factory=list)
    connections: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def wait_requests(self, count: int, *, timeout: float = 10.0) -> list[Received]:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while len(self.requests) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.requests

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                request = Received(
                    method=event.method.decode(),
                    target=event.target.decode(),
                    headers={k.decode().lower(): v.decode() for k, v in event.headers},
                    body=b"",
                )
                continue
            if isinstance(event, h11.Data):
                request.body += event.data
                continue
            if isinstance(event, h11.EndOfMessage):
                self.requests.append(request)
                self._changed.set()
                if self.hang:
                    await trio.sleep_forever()
                if self.gate is not None:
                    await self.gate.wait()
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                    or b""
                )
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                conn.start_next_cycle()
                continue
            return


@asynccontextmanager
async def http_sink(*, hang: bool = False, gate: trio.Event | None = None) -> AsyncIterator[Sink]:
    sink = Sink(port=0, hang=hang, gate=gate)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1")
        )
        sink.port = listeners[0].socket.getsockname()[1]
        yield sink
        nursery.cancel_scope.cancel()


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "Bob <bob@example.com>, carol@example.org"
    msg["Subject"] = subject
    msg.set_content("Hi,\n\nsee attached.\n")
    msg.add_attachment(b"%PDF-1.4 test", maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes()


def settings_for(base_url: str, *, shutdown_timeout: float = 2.0) -> list[str]:
    return [
        f"Api:BaseUrl={base_url}",
        f"Internal:ApiKey={API_KEY}",
        f"Api:TimeoutSeconds={API_TIMEOUT}",
        "HealthCheck:DnsMxDomain=",
        f"Smtp:ShutdownTimeoutSeconds={shutdown_timeout}",
    ]


def send_timed(port: int, key: str, subjects: list[str]) -> list[float]:
    """Send one message per subject on one session; seconds from end of data to reply."""
    elapsed = []
    with client(port, timeout=30) as smtp:
        smtp.ehlo("client.example")
        smtp.login("alice@example.com", key)
        for subject in subjects:
            assert smtp.mail("alice@example.com")[0] == 250
            assert smtp.rcpt("bob@example.com")[0] == 250
            assert smtp.rcpt("carol@example.org")[0] == 250
            smtp.putcmd("data")
            assert smtp.getreply()[0] == 354
            smtp.send(message(subject).replace(b"\n", b"\r\n") + b"\r\n.\r\n")
            started = time.monotonic()
            code, _ = smtp.getreply()
            elapsed.append(time.monotonic() - started)
            assert code == 250
    return elapsed


async def test_sink_receives_the_exact_notification(tmp_path: Path, store: SqliteStore) -> None:
    alice = await add_account(store, "alice@example.com", name="Alice")
    bob = await add_account(store, "bob@example.com", name="Bob")
    async with http_sink() as sink:
        settings = make_settings(tmp_path, *settings_for(f"http://127.0.0.1:{sink.port}"))
        async with running_server(settings, store) as running:
            port = running.port("submission")
            await in_thread(lambda: send_timed(port, alice.key, ["Quarterly report"]))
            [request] = await sink.wait_requests(1)
    [stored] = await store.list_emails(10)
    assert request.method == "POST"
    assert request.target == "/api/internal/notifications/new-email"
    assert request.headers["authorization"] == f"ApiKey {API_KEY}"
    assert request.headers["content-type"].startswith("application/json")
    payload = json.loads(request.body)
    assert payload == {
        "userIds": [str(bob.user.id)],
        "email": {
            "id": str(stored.id),
            "from": "alice@example.com",
            "fromDisplay": "Alice Example",
            "subject": "Quarterly report",
            "receivedAt": payload["email"]["receivedAt"],
            "hasAttachments": True,
        },
    }
    received_at = datetime.fromisoformat(payload["email"]["receivedAt"])
    assert received_at.utcoffset() == timedelta(0)
    stored_at = stored.received_at
    if stored_at.tzinfo is None:
        stored_at = stored_at.replace(tzinfo=UTC)
    assert abs(received_at - stored_at) < timedelta(seconds=1)
    assert len(sink.requests) == 1


async def test_no_post_without_local_recipients(tmp_path: Path, store: SqliteStore) -> None:
    alice = await add_account(store, "alice@example.com")
    async with http_sink() as sink:
        settings = make_settings(tmp_path, *settings_for(f"http://127.0.0.1:{sink.port}"))
        async with running_server(settings, store) as running:
            port = running.port("submission")

            def send() -> None:
                with client(port) as smtp:
                    smtp.login("alice@example.com", alice.key)
                    smtp.sendmail("alice@example.com", ["carol@example.org"], message("external"))

            await in_thread(send)
        # The server has shut down, so its notification queue has drained.
        assert len(await store.list_emails(10)) == 1
        assert sink.requests == [] and sink.connections == 0


async def test_api_down_does_not_delay_or_lose_mail(tmp_path: Path, store: SqliteStore) -> None:
    alice = await add_account(store, "alice@example.com")
    await add_account(store, "bob@example.com")
    closed = free_port()
    settings = make_settings(
        tmp_path, *settings_for(f"http://127.0.0.1:{closed}", shutdown_timeout=0.5)
    )
    with watch_log("relate_smtp.notify") as notify_log:
        async with running_server(settings, store) as running:
            port = running.port("submission")
            elapsed = await in_thread(lambda: send_timed(port, alice.key, ["one", "two", "three"]))
            # Three connection attempts with backoff, then one warning: the first notification.
            [warning] = await notify_log.wait_for(r"failed after 3 attempt\(s\)")
    assert len(await store.list_emails(10)) == 3
    assert max(elapsed) < 1.0, elapsed
    assert "ConnectError" in warning


async def test_hanging_api_does_not_delay_or_lose_mail(tmp_path: Path, store: SqliteStore) -> None:
    alice = await add_account(store, "alice@example.com")
    await add_account(store, "bob@example.com")
    async with http_sink(hang=True) as sink:
        settings = make_settings(
            tmp_path, *settings_for(f"http://127.0.0.1:{sink.port}", shutdown_timeout=1)
        )
        async with running_server(settings, store) as running:
            port = running.port("submission")
            first = await in_thread(lambda: send_timed(port, alice.key, ["one"]))
            # The API now holds the first notification without answering.
            await sink.wait_requests(1)
            rest = await in_thread(lambda: send_timed(port, alice.key, ["two", "three"]))
            shutdown_started = trio.current_time()
        shutdown_took = trio.current_time() - shutdown_started
    assert len(await store.list_emails(10)) == 3
    assert max(first + rest) < 1.0, first + rest
    # Draining a hung API is bounded by Smtp:ShutdownTimeoutSeconds (1 s here).
    assert shutdown_took < 1 + 1.5, shutdown_took
    assert len(sink.requests) == 1


async def test_queued_notifications_drain_at_shutdown(tmp_path: Path, store: SqliteStore) -> None:
    alice = await add_account(store, "alice@example.com")
    await add_account(store, "bob@example.com")
    gate = trio.Event()
    async with http_sink(gate=gate) as sink:
        settings = make_settings(tmp_path, *settings_for(f"http://127.0.0.1:{sink.port}"))
        async with running_server(settings, store) as running:
            port = running.port("submission")
            elapsed = await in_thread(lambda: send_timed(port, alice.key, ["a", "b", "c"]))
            # The API holds the first answer: the other two are still queued.
            await sink.wait_requests(1)
            running.server.shutdown()
            gate.set()
        # Leaving running_server waited for the drain.
        assert [json.loads(r.body)["email"]["subject"] for r in sink.requests] == ["a", "b", "c"]
    assert max(elapsed) < 1.0, elapsed


async def test_base_url_path_is_replaced_as_the_original_resolves_it(
    tmp_path: Path, store: SqliteStore
) -> None:
    """``Api:BaseUrl`` with a path: the absolute notification path replaces it (RFC 3986
    merge, .NET HttpClient), so the API sees the same target as from the original."""
    alice = await add_account(store, "alice@example.com")
    await add_account(store, "bob@example.com")
    async with http_sink() as sink:
        base = f"http://127.0.0.1:{sink.port}/relate/?tenant=a"
        settings = make_settings(tmp_path, *settings_for(base))
        async with running_server(settings, store) as running:
            port = running.port("submission")
            await in_thread(lambda: send_timed(port, alice.key, ["with a base path"]))
            [request] = await sink.wait_requests(1)
    assert request.target == "/api/internal/notifications/new-email"
