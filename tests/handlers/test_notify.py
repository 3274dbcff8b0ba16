"""The API notifier: payload, headers, retry rules, bounded queue, drain at shutdown."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import httpx
import pytest
import trio
import trio.testing

from relate_smtp.handlers.notify import Notifier, notification_payload, notification_url
from relate_smtp.storage import Attachment, NewEmail, SavedEmail

USER_A = uuid.UUID("11111111-1111-1111-1111-111111111111")
USER_B = uuid.UUID("22222222-2222-2222-2222-222222222222")
EMAIL_ID = uuid.UUID("33333333-3333-3333-3333-333333333333")
RECEIVED = datetime.datetime(2026, 11, 26, 18, 5, 19, 123456, tzinfo=datetime.UTC)
URL = "http://api.test/api/internal/notifications/new-email"


def new_email(
    *, received_at: datetime.datetime = RECEIVED, attachments: tuple[Attachment, ...] = ()
) -> NewEmail:
    return NewEmail(
        id=EMAIL_ID,
        message_id="<m1@example.com>",
        from_address="alice@example.com",
        from_display_name="Alice Ä.",
        subject="Hello",
        text_body="hi",
        html_body=None,
        received_at=received_at,
        size_bytes=123,
        in_reply_to=None,
        references=None,
        sent_by_user_id=None,
        header_recipients=(),
        envelope_recipients=("bob@example.com",),
        attachments=attachments,
    )


def saved(*users: uuid.UUID, email_id: uuid.UUID = EMAIL_ID) -> SavedEmail:
    return SavedEmail(id=email_id, thread_id=None, linked_user_ids=users)


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Api:
    """A scripted API behind httpx.MockTransport; records requests and their times."""

    def __init__(self, *answers: int | Exception | None) -> None:
        self.answers = list(answers)  # None: hang until cancelled
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        answer = self.answers.pop(0) if self.answers else 200
        if answer is None:
            await trio.sleep_forever()
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, int)
        return httpx.Response(answer)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))


def notifier(api: Api, *, key: str | None = "secret-key", **options: object) -> Notifier:
    return Notifier("http://api.test", key, timeout=10, client=api.client(), **options)  # type: ignore[arg-type]


async def deliver_all(n: Notifier, nursery: trio.Nursery) -> None:
    await nursery.start(n.run)
    await n.aclose(60)


# ---------------------------------------------------------------------------- payload


def test_payload_has_the_original_shape() -> None:
    payload = notification_payload(new_email(), saved(USER_B, USER_A, USER_B))
    assert payload == {
        "userIds": [str(USER_B), str(USER_A)],
        "email": {
            "id": str(EMAIL_ID),
            "from": "alice@example.com",
            "fromDisplay": "Alice Ä.",
            "subject": "Hello",
            "receivedAt": "2026-11-26T18:05:19.123456+00:00",
            "hasAttachments": False,
        },
    }


EST = datetime.timezone(-datetime.timedelta(hours=5))


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (datetime.datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000000+00:00"),
        (datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=EST), "2026-01-02T08:04:05.000000+00:00"),
    ],
)
def test_received_at_is_always_utc_with_microseconds(
    received: datetime.datetime, expected: str
) -> None:
    email = notification_payload(new_email(received_at=received), saved(USER_A))["email"]
    assert isinstance(email, dict) and email["receivedAt"] == expected


def test_has_attachments() -> None:
    attachment = Attachment(file_name="a.txt", content_type="text/plain", content=b"x")
    email = notification_payload(new_email(attachments=(attachment,)), saved(USER_A))["email"]
    assert isinstance(email, dict) and email["hasAttachments"] is True


# ---------------------------------------------------------------------------- real socket


async def test_posts_exact_json_and_api_key_over_http(nursery: trio.Nursery) -> None:
    received: list[tuple[h11.Request, bytes]] = []
    got = trio.Event()

    async def api(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        received.append((request, body))
        await stream.send_all(conn.send(h11.Response(status_code=204, headers=[])) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        got.set()

    listeners = await nursery.start(partial(trio.serve_tcp, api, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    n = Notifier(f"http://127.0.0.1:{port}/", "k3y", timeout=5)
    await nursery.start(n.run)
    n.message_stored(new_email(), saved(USER_A, USER_A))
    with trio.fail_after(10):
        await got.wait()
        await n.aclose(5)

    [(request, body)] = received
    assert request.method == b"POST"
    assert request.target == b"/api/internal/notifications/new-email"
    headers = dict(request.headers)
    assert headers[b"authorization"] == b"ApiKey k3y"
    assert headers[b"content-type"] == b"application/json; charset=utf-8"
    assert json.loads(body) == {
        "userIds": [str(USER_A)],
        "email": {
            "id": str(EMAIL_ID),
            "from": "alice@example.com",
            "fromDisplay": "Alice Ä.",
            "subject": "Hello",
            "receivedAt": "2026-11-26T18:05:19.123456+00:00",
            "hasAttachments": False,
        },
    }


async def test_connection_refused_is_retried_then_given_up(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n = Notifier(f"http://127.0.0.1:{port}", None, timeout=5, retry_delay=0.001)
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"), trio.fail_after(10):
        await deliver_all(n, nursery)
    assert "failed after 3 attempt(s): ConnectError" in caplog.text


# ---------------------------------------------------------------------------- mock API


async def test_no_authorization_header_without_a_key(nursery: trio.Nursery) -> None:
    api = Api()
    n = notifier(api, key=None)
    n.message_stored(new_email(), saved(USER_A))
    await deliver_all(n, nursery)
    [request] = api.requests
    assert "authorization" not in request.headers
    assert str(request.url) == URL


async def test_api_key_header(nursery: trio.Nursery) -> None:
    api = Api()
    n = notifier(api, key="abc")
    n.message_stored(new_email(), saved(USER_A))
    await deliver_all(n, nursery)
    assert api.requests[0].headers["authorization"] == "ApiKey abc"


async def test_no_post_without_linked_users(nursery: trio.Nursery) -> None:
    api = Api()
    n = notifier(api)
    n.message_stored(new_email(), saved())
    await deliver_all(n, nursery)
    assert api.requests == []


@pytest.mark.parametrize("failure", [500, 503, httpx.ConnectError("refused")])
async def test_retried_up_to_three_tries_with_backoff(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    failure: int | Exception,
) -> None:
    api = Api(failure, failure, failure, 200)
    n = notifier(api)
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        await deliver_all(n, nursery)
    assert len(api.requests) == 3
    start = api.times[0]
    assert [t - start for t in api.times] == pytest.approx([0, 0.5, 1.5])
    assert "failed after 3 attempt(s)" in caplog.text


async def test_success_on_a_retry_stops_retrying(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api(httpx.ConnectTimeout("slow connect"), 502, 202)
    n = notifier(api)
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        await deliver_all(n, nursery)
    assert len(api.requests) == 3
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("failure", "logged"),
    [
        (400, "refused the notification"),
        (401, "HTTP 401"),
        (404, "HTTP 404"),
        (httpx.ReadTimeout("read timed out"), "ReadTimeout"),
        (httpx.RemoteProtocolError("server disconnected"), "not retried"),
    ],
)
async def test_not_retried(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    failure: int | Exception,
    logged: str,
) -> None:
    api = Api(failure, 200)
    n = notifier(api)
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        await deliver_all(n, nursery)
    assert len(api.requests) == 1
    assert logged in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records)


async def test_slow_api_is_not_notified_twice(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api(None, 200)
    n = notifier(api)
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        await deliver_all(n, nursery)
    assert len(api.requests) == 1
    assert trio.current_time() == pytest.approx(10)
    assert "did not answer" in caplog.text


async def test_next_notifications_follow_a_failed_one(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    api = Api(400, 200)
    n = notifier(api)
    first, second = uuid.uuid4(), uuid.uuid4()
    n.message_stored(new_email(), saved(USER_A, email_id=first))
    n.message_stored(new_email(), saved(USER_A, email_id=second))
    await deliver_all(n, nursery)
    ids = [json.loads(r.content)["email"]["id"] for r in api.requests]
    assert ids == [str(first), str(second)]


# ---------------------------------------------------------------------------- queue


async def test_full_queue_drops_with_a_warning_and_never_blocks(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api()
    n = notifier(api, queue_size=2)
    ids = [uuid.uuid4() for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        for email_id in ids:
            n.message_stored(new_email(), saved(USER_A, email_id=email_id))
    assert f"dropped the notification for email {ids[2]}" in caplog.text
    await deliver_all(n, nursery)
    assert [json.loads(r.content)["email"]["id"] for r in api.requests] == [
        str(ids[0]),
        str(ids[1]),
    ]


async def test_hanging_api_does_not_block_message_stored(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api(None, None, None, None)
    n = Notifier("http://api.test", None, timeout=1000, client=api.client(), queue_size=3)
    await nursery.start(n.run)
    n.message_stored(new_email(), saved(USER_A))
    await trio.testing.wait_all_tasks_blocked()
    assert len(api.requests) == 1  # the consumer is stuck in the first request
    before = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        for _ in range(4):
            n.message_stored(new_email(), saved(USER_A, email_id=uuid.uuid4()))
        assert trio.current_time() == before
        assert caplog.text.count("queue full") == 1
        # Shutdown gives up on the stuck request at its deadline.
        await n.aclose(timeout=7)
    assert trio.current_time() - before == pytest.approx(7)
    assert "3 notification(s) not delivered within 7 s" in caplog.text


async def test_drain_on_close_delivers_everything_queued(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    api = Api(503, 200, 200, 200, 200, 200)
    n = notifier(api)
    ids = [uuid.uuid4() for _ in range(5)]
    for email_id in ids:
        n.message_stored(new_email(), saved(USER_A, email_id=email_id))
    await nursery.start(n.run)
    await n.aclose(timeout=20)
    delivered = [json.loads(r.content)["email"]["id"] for r in api.requests]
    assert delivered == [str(ids[0])] + [str(i) for i in ids]


async def test_messages_after_close_are_dropped(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    api = Api()
    n = notifier(api)
    await deliver_all(n, nursery)
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"):
        n.message_stored(new_email(), saved(USER_A))
    assert "shut down" in caplog.text
    assert api.requests == []


async def test_close_without_run_returns_at_once(caplog: pytest.LogCaptureFixture) -> None:
    n = notifier(Api())
    n.message_stored(new_email(), saved(USER_A))
    with caplog.at_level(logging.WARNING, logger="relate_smtp.notify"), trio.fail_after(1):
        await n.aclose(timeout=30)
    assert "1 notification(s) not delivered" in caplog.text


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://api:5000", "http://api:5000/api/internal/notifications/new-email"),
        ("http://api:5000/", "http://api:5000/api/internal/notifications/new-email"),
        ("http://api:5000/relate/", "http://api:5000/api/internal/notifications/new-email"),
        ("https://api.test/x/y?q=1#f", "https://api.test/api/internal/notifications/new-email"),
        ("http://u:p@api:5000/x", "http://u:p@api:5000/api/internal/notifications/new-email"),
    ],
)
def test_url_is_resolved_like_dotnet_httpclient(base: str, url: str) -> None:
    assert notification_url(base) == url
