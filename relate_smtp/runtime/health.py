"""The health and metrics endpoint (``HealthCheck:Url``): ``/healthz`` and ``/metrics`` over h11.

``GET /healthz`` answers in the original host's JSON format (SPEC §7) so that existing
probes, load balancers and dashboards keep working; ``GET /metrics`` is Prometheus'
text exposition of the server's registry. The endpoint is unauthenticated and faces
whatever network the operator exposes it to, so every connection is bounded: request
head and body sizes, a deadline for a request's first byte and one for all of it, and caps
on concurrent connections per client address and overall. A slow or broken client costs
one task and never delays another.

The caps evict rather than refuse. A liveness probe that is refused restarts the pod, so
a newcomer over a cap displaces the oldest connection still waiting for its request (an
idle socket, a trickler, a kept-alive scraper between scrapes), never a probe's; only when
every connection is busy answering does the oldest of those go. A hundred sockets that
never send a byte therefore cost a real probe nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Final

import attrs
import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relate_smtp.addresses import plain_address
from relate_smtp.runtime.checks import HealthCheck, HealthReport, run_checks
from relate_smtp.runtime.health_connections import ConnectionTable, Slot
from relate_smtp.runtime.health_sockets import HealthBindError, bind_endpoints, host_and_port
from relate_smtp.runtime.listeners import BoundListener, StartupError

__all__ = ["HealthServer", "render_report", "start_health_server"]

log = logging.getLogger("relate_smtp.health")

# h11's own default for the request line and headers; a probe sends a few hundred bytes.
MAX_REQUEST_HEAD: Final = 16 * 1024
# Neither route takes a body; one is read (to keep the connection usable) up to this.
MAX_REQUEST_BODY: Final = 64 * 1024
# A probe writes its request as soon as it has connected, so anything beyond a round trip
# is a socket holding a slot for nothing; gunicorn closes idle keep-alives after 2 s too.
FIRST_BYTE_TIMEOUT: Final = 2.0
# A whole request, head and body, from the moment it is awaited: a probe's is a few
# hundred bytes, so this only bounds a trickler, who is evictable meanwhile anyway.
REQUEST_TIMEOUT: Final = 10.0
# A kubelet probes from its node's address: liveness, readiness and startup probes and a
# scraper may overlap, a handful at most. Eight leaves headroom, and one address can then
# take no more than an eighth of the endpoint.
MAX_CONNECTIONS_PER_CLIENT: Final = 8
# Every probe and scraper of a cluster at once, with room to spare; a connection costs a
# task and a socket, so 64 stay cheap. Reaching it evicts, so it never refuses a probe.
MAX_CONNECTIONS: Final = 64
_RECEIVE_SIZE: Final = 8192
# How long a closing connection waits for the client to read our last response and
# close its side, so that unread input does not turn our close into a reset.
_CLOSE_LINGER: Final = 1.0

# The hosts of HealthCheck:Url endpoints that are not one address (SPEC §2, as Kestrel).

# What ASP.NET's WriteAsJsonAsync sends, and the headers its health middleware adds so
# that no cache between a probe and the host ever answers for the host.
_JSON: Final = "application/json; charset=utf-8"
_NO_CACHE: Final = (
    ("Cache-Control", "no-store, no-cache"),
    ("Pragma", "no-cache"),
    ("Expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
)
_TEXT: Final = "text/plain; charset=utf-8"
_METHODS: Final = (b"GET", b"HEAD")
_ALLOW: Final = ("Allow", "GET, HEAD")


class _BodyTooLarge(Exception):
    pass


class _ReadTimeout(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


# A route's handler and the methods it answers (None: every method).
_Route = tuple[Callable[[], Awaitable[_Response]], tuple[bytes, ...] | None]


def render_report(report: HealthReport) -> bytes:
    """The original's JSON: durations in milliseconds, nulls kept, camelCase keys."""
    document = {
        "status": report.status,
        "totalDuration": _ms(report.total_duration),
        "checks": [
            {
                "name": outcome.check.name,
                "status": outcome.result.status,
                "duration": _ms(outcome.duration),
                "description": outcome.result.description,
                "exception": outcome.result.exception,
                "tags": list(outcome.check.tags),
                "data": dict(outcome.result.data) if outcome.result.data is not None else None,
            }
            for outcome in report.outcomes
        ],
    }
    # default=str: a check's data is free-form; a stray datetime must not fail the probe.
    return json.dumps(document, default=str).encode()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


class HealthServer:
    """Serves ``/healthz`` and ``/metrics`` on one address until cancelled."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        checks: Sequence[HealthCheck],
        registry: CollectorRegistry,
        *,
        first_byte_timeout: float = FIRST_BYTE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._checks = tuple(checks)
        self._registry = registry
        self._first_byte_timeout = min(first_byte_timeout, request_timeout)
        self._request_timeout = request_timeout
        self._table = ConnectionTable(
            max_total=max_connections, max_per_client=max_connections_per_client
        )
        # /healthz answers every method, as the original's MapHealthChecks; None = any.
        self._routes: dict[bytes, _Route] = {
            b"/healthz": (self._healthz, None),
            b"/metrics": (self._metrics, _METHODS),
        }

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every endpoint, report each socket's ``(host, port)`` through
        ``task_status``, serve forever.

        Raises :class:`HealthBindError` when an endpoint cannot be bound.
        """
        sockets = bind_endpoints(self._endpoints)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        bound = [host_and_port(sock) for sock in sockets]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
            task_status.started(bound)

    async def handle_connection(
        self, stream: trio.abc.HalfCloseableStream, *, client: str | None = None
    ) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes, misbehaves or is
        evicted. ``client`` is the peer's address, read from the socket when not given."""
        if client is None:
            client = _peer_address(stream)
        if client is None:
            await trio.aclose_forcefully(stream)
            return
        slot, eviction = self._table.admit(client)
        if eviction is not None:
            victim = eviction.slot
            log.debug("health connection from %s evicted: %s", victim.client, eviction.reason)
            victim.scope.cancel()
        try:
            with slot.scope:
                await self._serve(stream, slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # The one place a bug in a request is caught: it ends this connection only.
            log.exception("health endpoint request failed")
        finally:
            self._table.release(slot)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.HalfCloseableStream, slot: Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            self._table.idle(slot)
            try:
                request = await self._read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, stream, slot, _plain(exc.error_status_hint))
                return
            except _BodyTooLarge:
                await self._refuse(conn, stream, slot, _plain(413))
                return
            except _ReadTimeout as exc:
                log.debug("health connection from %s closed: %s", slot.client, exc.reason)
                return
            if request is None:
                return  # closed by the client
            self._table.busy(slot)
            with trio.move_on_after(self._request_timeout) as responding:
                response = await self._route(request)
                head = request.method == b"HEAD"
                await self._send_response(conn, stream, response, head=head, close=False)
            if responding.cancelled_caught:
                log.debug(
                    "health connection from %s closed: no response within %g s",
                    slot.client,
                    self._request_timeout,
                )
                return
            if conn.our_state is h11.MUST_CLOSE:
                self._table.idle(slot)
                await self._linger(stream)
                return
            conn.start_next_cycle()

    async def _refuse(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        slot: Slot,
        response: _Response,
    ) -> None:
        """Answer a bad request with ``response`` and close."""
        self._table.busy(slot)
        with trio.move_on_after(self._request_timeout):
            await self._send_response(conn, stream, response, head=False, close=True)
            self._table.idle(slot)
            await self._linger(stream)

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream
    ) -> h11.Request | None:
        """The next request, its body read and discarded; None if the client closed.

        Raises :class:`_ReadTimeout` when no byte of it comes within the first-byte
        timeout (a kept-alive connection between requests is held to it too), or all of
        it within the request timeout. Bytes pipelined behind the last request count as
        its first.
        """
        started = trio.current_time()
        begun = bool(conn.trailing_data[0])
        timeout = self._request_timeout if begun else self._first_byte_timeout
        with trio.CancelScope(deadline=started + timeout) as deadline:
            request: h11.Request | None = None
            body = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        interim = h11.InformationalResponse(status_code=100, headers=[])
                        await _send(conn, stream, interim)
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if data and not begun:
                        begun = True
                        deadline.deadline = started + self._request_timeout
                    conn.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > MAX_REQUEST_BODY:
                        raise _BodyTooLarge
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        if begun:
            raise _ReadTimeout(f"request incomplete after {self._request_timeout:g} s")
        raise _ReadTimeout(f"no request within {self._first_byte_timeout:g} s")

    async def _route(self, request: h11.Request) -> _Response:
        route = self._routes.get(_route_path(request.target))
        if route is None:
            return _plain(404)
        handler, methods = route
        if methods is not None and request.method not in methods:
            return _plain(405, headers=(_ALLOW,))
        return await handler()

    async def _healthz(self) -> _Response:
        report = await run_checks(self._checks)
        # Degraded still serves traffic: only Unhealthy takes the host out of rotation.
        status = 503 if report.status == "Unhealthy" else 200
        return _Response(status, render_report(report), _JSON, _NO_CACHE[1:])

    async def _metrics(self) -> _Response:
        return _Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)

    async def _send_response(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        response: _Response,
        *,
        head: bool,
        close: bool,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            # As ASP.NET's health endpoint: a cached verdict is a wrong verdict.
            _NO_CACHE[0],
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        await _send(
            conn,
            stream,
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=HTTPStatus(response.status).phrase,
            ),
        )
        if response.body and not head:
            await _send(conn, stream, h11.Data(data=response.body))
        await _send(conn, stream, h11.EndOfMessage())

    async def _linger(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Half-close and let the client read what we sent before the socket closes."""
        with trio.move_on_after(_CLOSE_LINGER):
            await stream.send_eof()
            received = 0
            while received <= MAX_REQUEST_BODY:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                if not chunk:
                    return
                received += len(chunk)


def _route_path(target: bytes) -> bytes:
    """ASP.NET routing: the query is ignored, case does not matter, and one trailing
    slash is allowed (``/HealthZ/`` reaches /healthz)."""
    path = target.partition(b"?")[0].lower()
    return path[:-1] if len(path) > 1 and path.endswith(b"/") else path


def _peer_address(stream: trio.abc.Stream) -> str | None:
    """The client's address in its one spelling; "" for a stream that is not a socket,
    None for a socket whose peer has already gone."""
    if not isinstance(stream, trio.SocketStream):
        return ""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    return plain_address(str(peer[0]))


def _plain(status: int, *, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, f"{HTTPStatus(status).phrase}\n".encode(), _TEXT, headers)


async def _send(conn: h11.Connection, stream: trio.abc.SendStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def start_health_server(
    nursery: trio.Nursery,
    endpoints: Sequence[tuple[str, int]],
    probe: Sequence[HealthCheck],
    registry: CollectorRegistry,
) -> list[BoundListener]:
    """/healthz and /metrics on every endpoint of ``HealthCheck:Url``."""
    server = HealthServer(endpoints, probe, registry)
    try:
        bound = await nursery.start(server.serve)
    except HealthBindError as exc:
        raise StartupError("HealthCheck:Url", str(exc)) from None
    return [BoundListener(name="health", host=host, port=port, tls="none") for host, port in bound]
