"""The /healthz and /metrics endpoint: JSON format, status codes, HTTP edge cases, timeouts,
and the caps that keep idle connections from starving a probe."""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Sequence
from typing import Any, cast

import h11
import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relate_smtp.runtime.checks import (
    CheckResult,
    HealthCheck,
    certificate_check,
    connection_pool_check,
    database_check,
    disk_space_check,
    memory_check,
)
from relate_smtp.runtime.checks import DiskUsage as Disk
from relate_smtp.runtime.health import (
    FIRST_BYTE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    REQUEST_TIMEOUT,
    HealthServer,
)
from relate_smtp.runtime.health_sockets import HealthBindError
from relate_smtp.storage import PoolStats, ServerConnections, Store, StoreUnavailable

GIB = 1024**3


class FakeStore:
    def __init__(self, *, down: bool = False, active: int = 5, maximum: int = 100) -> None:
        self.down = down
        self.pool = PoolStats(active=maximum, maximum=maximum)  # a busy pool is no signal
        self.server = ServerConnections(active=active, maximum=maximum)

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("connection to server at 10.0.0.5:5432 refused")

    def pool_stats(self) -> PoolStats:
        return self.pool

    async def server_connections(self) -> ServerConnections:
        await trio.lowlevel.checkpoint()
        return self.server


def original_checks(
    store: FakeStore, *, free: int = 50 * GIB, rss: int = 300 * 1024**2
) -> list[HealthCheck]:
    s = cast(Store, store)
    return [
        database_check(s),
        connection_pool_check(s),
        disk_space_check(
            "/", usage=lambda _: Disk(total=100 * GIB, used=100 * GIB - free, free=free)
        ),
        memory_check(rss=lambda: rss),
        certificate_check(lambda: CheckResult(status="Healthy", description="No certificate")),
    ]


async def start(
    nursery: trio.Nursery,
    checks: Sequence[HealthCheck] = (),
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> str:
    server = HealthServer([("127.0.0.1", 0)], checks, registry or CollectorRegistry(), **options)
    [(host, port)] = await nursery.start(server.serve)
    return f"http://{host}:{port}"


async def get_json(url: str) -> tuple[httpx.Response, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url + "/healthz")
    return response, json.loads(response.content)


# ---------------------------------------------------------------------------- /healthz


async def test_all_healthy_in_the_original_format(nursery: trio.Nursery) -> None:
    url = await start(nursery, original_checks(FakeStore()))
    response, body = await get_json(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["cache-control"] == "no-store, no-cache"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert list(body) == ["status", "totalDuration", "checks"]
    assert body["status"] == "Healthy"
    assert isinstance(body["totalDuration"], (int, float))
    assert [c["name"] for c in body["checks"]] == [
        "database",
        "connection-pool",
        "disk-space",
        "memory",
        "certificate",
    ]
    for check in body["checks"]:
        assert list(check) == [
            "name",
            "status",
            "duration",
            "description",
            "exception",
            "tags",
            "data",
        ]
        assert check["status"] == "Healthy"
        assert isinstance(check["duration"], (int, float)) and check["duration"] >= 0
        assert check["description"] is None or isinstance(check["description"], str)
        assert check["exception"] is None
        assert isinstance(check["tags"], list) and all(isinstance(t, str) for t in check["tags"])
        assert check["data"] is None or isinstance(check["data"], dict)
    by_name = {c["name"]: c for c in body["checks"]}
    assert by_name["database"]["tags"] == ["infrastructure"]
    assert by_name["database"]["data"] is None
    assert by_name["connection-pool"]["data"] == {
        "activeConnections": 5,
        "maxConnections": 100,
        "usedPercent": 5.0,
    }
    assert by_name["disk-space"]["data"] == {
        "availableGB": 50.0,
        "totalGB": 100.0,
        "usedPercent": 50.0,
    }
    assert by_name["memory"]["data"] == {"workingSetMB": 300.0}


async def test_database_down_is_unhealthy_503(nursery: trio.Nursery) -> None:
    url = await start(nursery, original_checks(FakeStore(down=True)))
    response, body = await get_json(url)
    assert response.status_code == 503
    assert body["status"] == "Unhealthy"
    database = body["checks"][0]
    assert database["status"] == "Unhealthy"
    assert database["exception"] == "connection to server at 10.0.0.5:5432 refused"


@pytest.mark.parametrize(
    ("active", "status", "code"),
    [(50, "Healthy", 200), (85, "Degraded", 200), (96, "Unhealthy", 503)],
)
async def test_pool_usage_grades_the_whole(
    nursery: trio.Nursery, active: int, status: str, code: int
) -> None:
    url = await start(nursery, original_checks(FakeStore(active=active)))
    response, body = await get_json(url)
    assert (response.status_code, body["status"]) == (code, status)
    assert body["checks"][1]["data"]["usedPercent"] == float(active)


@pytest.mark.parametrize(
    ("free", "rss", "status", "code"),
    [
        (500 * 1024**2, 300 * 1024**2, "Degraded", 200),
        (50 * 1024**2, 300 * 1024**2, "Unhealthy", 503),
        (50 * GIB, 1600 * 1024**2, "Degraded", 200),
        (50 * GIB, 1950 * 1024**2, "Unhealthy", 503),
    ],
)
async def test_disk_and_memory_grade_the_whole(
    nursery: trio.Nursery, free: int, rss: int, status: str, code: int
) -> None:
    url = await start(nursery, original_checks(FakeStore(), free=free, rss=rss))
    response, body = await get_json(url)
    assert (response.status_code, body["status"]) == (code, status)


async def test_certificate_degraded_makes_the_whole_degraded_but_200(
    nursery: trio.Nursery,
) -> None:
    checks = original_checks(FakeStore())
    checks[-1] = certificate_check(
        lambda: CheckResult(
            status="Degraded",
            description="Certificate expires in 20 days",
            data={"subject": "CN=mx.example", "daysUntilExpiry": 20.5},
        )
    )
    url = await start(nursery, checks)
    response, body = await get_json(url)
    assert response.status_code == 200
    assert body["status"] == "Degraded"
    assert body["checks"][-1]["data"] == {"subject": "CN=mx.example", "daysUntilExpiry": 20.5}


async def test_a_crashing_check_is_reported_not_fatal(nursery: trio.Nursery) -> None:
    async def crash() -> CheckResult:
        raise ZeroDivisionError("division by zero")

    url = await start(nursery, [HealthCheck(name="buggy", tags=("x",), probe=crash)])
    response, body = await get_json(url)
    assert response.status_code == 503
    assert body["checks"][0]["exception"] == "division by zero"
    # The endpoint still works afterwards.
    response, _ = await get_json(url)
    assert response.status_code == 503


async def test_head_has_headers_and_no_body(nursery: trio.Nursery) -> None:
    url = await start(nursery, original_checks(FakeStore()))
    async with httpx.AsyncClient() as client:
        response = await client.head(url + "/healthz")
        metrics = await client.head(url + "/metrics")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0
    assert metrics.status_code == 200
    assert metrics.content == b""


# ---------------------------------------------------------------------------- /metrics


async def test_metrics_expose_the_registry(nursery: trio.Nursery) -> None:
    registry = CollectorRegistry()
    counter = Counter("smtp_messages_received", "test", registry=registry)
    counter.inc(3)
    url = await start(nursery, registry=registry)
    async with httpx.AsyncClient() as client:
        response = await client.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "smtp_messages_received_total 3.0" in response.text.splitlines()


# ---------------------------------------------------------------------------- HTTP errors


async def test_unknown_path_is_404(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    async with httpx.AsyncClient() as client:
        assert (await client.get(url + "/health")).status_code == 404
        assert (await client.post(url + "/nope")).status_code == 404


async def test_wrong_method_on_metrics_is_405_with_allow(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    async with httpx.AsyncClient() as client:
        response = await client.post(url + "/metrics", content=b"{}")
        again = await client.delete(url + "/metrics")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert again.status_code == 405


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_healthz_answers_every_method_like_map_health_checks(
    nursery: trio.Nursery, method: str
) -> None:
    url = await start(nursery, original_checks(FakeStore()))
    async with httpx.AsyncClient() as client:
        response = await client.request(method, url + "/healthz", content=b"{}")
    assert response.status_code == 200
    assert json.loads(response.content)["status"] == "Healthy"


@pytest.mark.parametrize("path", ["/healthz/", "/HEALTHZ", "/HealthZ/?probe=1"])
async def test_healthz_path_is_matched_as_asp_net_routes(nursery: trio.Nursery, path: str) -> None:
    url = await start(nursery)
    async with httpx.AsyncClient() as client:
        response = await client.get(url + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"


async def test_query_string_is_ignored(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    async with httpx.AsyncClient() as client:
        assert (await client.get(url + "/healthz?probe=liveness")).status_code == 200


async def raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data``, return everything until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def test_malformed_request_is_400_and_closed(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    received = await raw_exchange(url, b"GARBAGE\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in received.lower()


async def test_oversized_head_is_refused(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    received = await raw_exchange(url, request)
    assert received.startswith(b"HTTP/1.1 431 ")


async def test_oversized_body_is_413(nursery: trio.Nursery) -> None:
    url = await start(nursery)
    body = b"x" * 70_000
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + body
    received = await raw_exchange(url, request)
    assert received.startswith(b"HTTP/1.1 413 ")


async def test_bind_failure_names_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer([("127.0.0.1", port)], [], CollectorRegistry())
        with pytest.raises(HealthBindError) as caught:
            await server.serve()
    assert caught.value.port == port
    assert f"cannot listen on port {port}" in str(caught.value)
    assert isinstance(caught.value, OSError)


# ---------------------------------------------------------------------------- in memory


class Client:
    """An h11 client over an in-memory stream, for keep-alive and timeout tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        headers = [("Host", "health"), ("Content-Length", str(len(body)))]
        outgoing: list[h11.Event] = [
            h11.Request(method=method, target=target, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ]
        for message in outgoing:
            await self.stream.send_all(self.conn.send(message) or b"")
        status, content = 0, b""
        response_headers: dict[bytes, bytes] = {}
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some()))
            elif isinstance(event, h11.Response):
                status, response_headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status, response_headers, content
            else:
                raise AssertionError(event)


async def test_keep_alive_serves_many_requests_on_one_connection(nursery: trio.Nursery) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry())
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_side)
    client = Client(client_side)
    assert (await client.request("GET", "/healthz"))[0] == 200
    assert (await client.request("GET", "/healthz", body=b"ignored body"))[0] == 200
    status, headers, _ = await client.request("PUT", "/metrics")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    assert (await client.request("GET", "/metrics"))[0] == 200


async def test_silent_client_times_out_while_another_is_served(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry())
    silent, silent_server_side = trio.testing.memory_stream_pair()
    active, active_server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, silent_server_side)
    nursery.start_soon(server.handle_connection, active_server_side)

    status, _, body = await Client(active).request("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "Healthy"
    assert trio.current_time() == 0

    assert await silent.receive_some() == b""  # closed by the server
    assert trio.current_time() == pytest.approx(FIRST_BYTE_TIMEOUT)


async def test_a_first_byte_buys_the_rest_of_the_request_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry())
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_side)
    await trio.sleep(FIRST_BYTE_TIMEOUT * 0.75)
    await client_side.send_all(b"GET /hea")
    assert await client_side.receive_some() == b""
    # The request deadline runs from when the request was awaited, not from its first byte.
    assert trio.current_time() == pytest.approx(REQUEST_TIMEOUT)


async def test_kept_alive_connection_is_held_to_the_first_byte_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry())
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_side)
    await trio.sleep(1)
    assert (await Client(client_side).request("GET", "/healthz"))[0] == 200
    assert await client_side.receive_some() == b""
    assert trio.current_time() == pytest.approx(1 + FIRST_BYTE_TIMEOUT)


async def test_trickling_client_is_cut_at_the_request_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry(), request_timeout=5)
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_side)
    closed = trio.Event()

    async def trickle() -> None:
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                await client_side.send_all(bytes([byte]))
                await trio.sleep(1)
        except trio.BrokenResourceError:
            closed.set()

    nursery.start_soon(trickle)
    assert await client_side.receive_some() == b""
    assert trio.current_time() == pytest.approx(5)
    await closed.wait()


# ---------------------------------------------------------------------------- idle floods


async def connect(nursery: trio.Nursery, server: HealthServer, client: str) -> trio.abc.Stream:
    """A connection from ``client``, admitted by the server before this returns."""
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(functools.partial(server.handle_connection, server_side, client=client))
    await trio.testing.wait_all_tasks_blocked()
    return client_side


def gated_check(gate: trio.Event) -> HealthCheck:
    """A check that answers only once ``gate`` is set: its connection stays busy."""

    async def probe() -> CheckResult:
        await gate.wait()
        return CheckResult(status="Healthy")

    return HealthCheck(name="gated", tags=(), probe=probe)


async def test_a_newcomer_over_the_cap_evicts_the_oldest_idle_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry(), max_connections=2)
    oldest = await connect(nursery, server, "192.0.2.1")
    older = await connect(nursery, server, "192.0.2.2")
    newcomer = await connect(nursery, server, "192.0.2.3")
    assert await oldest.receive_some() == b""
    assert trio.current_time() == 0
    assert (await Client(newcomer).request("GET", "/healthz"))[0] == 200
    assert (await Client(older).request("GET", "/healthz"))[0] == 200


async def test_a_connection_being_answered_is_spared(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    gate = trio.Event()
    server = HealthServer(
        [("127.0.0.1", 0)], [gated_check(gate)], CollectorRegistry(), max_connections=2
    )
    busy = await connect(nursery, server, "192.0.2.1")
    busy_client = Client(busy)
    answer: list[int] = []

    async def probe() -> None:
        answer.append((await busy_client.request("GET", "/healthz"))[0])

    nursery.start_soon(probe)
    await trio.testing.wait_all_tasks_blocked()  # its request is read, the check waits
    idle = await connect(nursery, server, "192.0.2.2")
    newcomer = await connect(nursery, server, "192.0.2.3")
    assert await idle.receive_some() == b""
    gate.set()
    assert (await Client(newcomer).request("GET", "/healthz"))[0] == 200
    await trio.testing.wait_all_tasks_blocked()
    assert answer == [200]


async def test_when_every_connection_is_busy_the_oldest_gives_way(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    gate = trio.Event()
    server = HealthServer(
        [("127.0.0.1", 0)], [gated_check(gate)], CollectorRegistry(), max_connections=1
    )
    busy = await connect(nursery, server, "192.0.2.1")
    await busy.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked()
    newcomer = await connect(nursery, server, "192.0.2.2")
    assert await busy.receive_some() == b""
    gate.set()
    assert (await Client(newcomer).request("GET", "/healthz"))[0] == 200
    assert trio.current_time() == 0


async def test_the_per_client_cap_evicts_that_clients_oldest_only(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry(), max_connections_per_client=2)
    other = await connect(nursery, server, "192.0.2.9")  # the oldest of all
    first = await connect(nursery, server, "192.0.2.1")
    second = await connect(nursery, server, "192.0.2.1")
    third = await connect(nursery, server, "192.0.2.1")
    assert await first.receive_some() == b""
    assert trio.current_time() == 0
    for survivor in (other, second, third):
        assert (await Client(survivor).request("GET", "/healthz"))[0] == 200


@pytest.mark.parametrize("clients", [1, 100], ids=["one-client", "many-clients"])
async def test_a_hundred_idle_connections_neither_delay_a_probe_nor_log_tracebacks(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    clients: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relate_smtp.health")
    server = HealthServer([("127.0.0.1", 0)], [], CollectorRegistry())
    idle = [await connect(nursery, server, f"10.0.0.{i % clients}") for i in range(100)]
    probe = await connect(nursery, server, "192.0.2.1")
    assert (await Client(probe).request("GET", "/healthz"))[0] == 200
    assert trio.current_time() == 0
    await probe.aclose()

    evicted = 100 + 1 - MAX_CONNECTIONS if clients > 1 else 100 - MAX_CONNECTIONS_PER_CLIENT
    for stream in idle:
        assert await stream.receive_some() == b""
    assert trio.current_time() == pytest.approx(FIRST_BYTE_TIMEOUT)
    records = [r for r in caplog.records if r.name == "relate_smtp.health"]
    assert len(records) == 100  # one line per connection evicted or timed out
    assert sum("evicted" in r.getMessage() for r in records) == evicted
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in records)


async def test_silent_socket_client_times_out_while_another_is_served(
    nursery: trio.Nursery,
) -> None:
    url = await start(nursery, request_timeout=0.5)
    host, port = url.removeprefix("http://").split(":")
    idle = await trio.open_tcp_stream(host, int(port))
    async with idle:
        async with httpx.AsyncClient() as client:
            assert (await client.get(url + "/healthz")).status_code == 200
        with trio.fail_after(5):
            assert await idle.receive_some() == b""
