"""The health and metrics endpoint (``HealthCheck:Url``): ``/healthz`` and ``/metrics`` over h11.

``GET /healthz`` answers in the original host's JSON format (SPEC §7) so that existing
probes, load balancers and dashboards keep working; ``GET /metrics`` is Prometheus'
text exposition of the server's registry. The endpoint is unauthenticated and faces
whatever network the operator exposes it to, so every connection is bounded: request
head and body sizes, a deadline per request, and a cap on concurrent connections. A
slow or broken client costs one task and never delays another.
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

from relate_smtp.runtime.checks import HealthCheck, HealthReport, run_checks

__all__ = ["HealthBindError", "HealthServer", "render_report"]

log = logging.getLogger("relate_smtp.health")

# h11's own default for the request line and headers; a probe sends a few hundred bytes.
MAX_REQUEST_HEAD: Final = 16 * 1024
# Neither route takes a body; one is read (to keep the connection usable) up to this.
MAX_REQUEST_BODY: Final = 64 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 100
_RECEIVE_SIZE: Final = 8192
# How long a closing connection waits for the client to read our last response and
# close its side, so that unread input does not turn our close into a reset.
_CLOSE_LINGER: Final = 1.0

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_METHODS: Final = (b"GET", b"HEAD")
_ALLOW: Final = ("Allow", "GET, HEAD")


class HealthBindError(OSError):
    """The health listener could not be bound; ``port`` is the configured port."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(f"cannot listen on port {port}: {reason}")
        self.errno = cause.errno
        self.host = host
        self.port = port


class _BodyTooLarge(Exception):
    pass


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


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
        host: str,
        port: int,
        checks: Sequence[HealthCheck],
        registry: CollectorRegistry,
        *,
        request_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._host = host
        self._port = port
        self._checks = tuple(checks)
        self._registry = registry
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._active = 0
        self._routes: dict[bytes, Callable[[], Awaitable[_Response]]] = {
            b"/healthz": self._healthz,
            b"/metrics": self._metrics,
        }

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report ``(host, bound port)`` through ``task_status``, serve forever.

        Raises :class:`HealthBindError` when the address cannot be bound.
        """
        try:
            listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        except OSError as exc:
            raise HealthBindError(self._host, self._port, exc) from exc
        if self._port == 0 and len(listeners) > 1:
            # With port 0 each address family would get a different free port; keep the
            # first so that the one port reported is the one served.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        first = listeners[0]
        assert isinstance(first, trio.SocketListener)
        port: int = first.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
            task_status.started((self._host, port))

    async def handle_connection(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes or misbehaves."""
        if self._active >= self._max_connections:
            await trio.aclose_forcefully(stream)
            return
        self._active += 1
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # The one place a bug in a request is caught: it ends this connection only.
            log.exception("health endpoint request failed")
        finally:
            self._active -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.HalfCloseableStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            request: h11.Request | None = None
            error: _Response | None = None
            # One deadline for the idle wait and the whole request: a client that
            # connects and stalls, or trickles bytes, is dropped when it passes.
            with trio.move_on_after(self._request_timeout):
                try:
                    request = await self._read_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    error = _plain(exc.error_status_hint)
                except _BodyTooLarge:
                    error = _plain(413)
            if error is not None:
                with trio.move_on_after(self._request_timeout):
                    await self._send_response(conn, stream, error, head=False, close=True)
                    await self._linger(stream)
                return
            if request is None:
                return  # closed by the client, or timed out
            with trio.move_on_after(self._request_timeout) as responding:
                response = await self._route(request)
                head = request.method == b"HEAD"
                await self._send_response(conn, stream, response, head=head, close=False)
            if responding.cancelled_caught:
                return
            if conn.our_state is h11.MUST_CLOSE:
                await self._linger(stream)
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream
    ) -> h11.Request | None:
        """The next request, its body read and discarded; None if the client closed."""
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    interim = h11.InformationalResponse(status_code=100, headers=[])
                    await _send(conn, stream, interim)
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
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

    async def _route(self, request: h11.Request) -> _Response:
        path = request.target.partition(b"?")[0]
        handler = self._routes.get(path)
        if handler is None:
            return _plain(404)
        if request.method not in _METHODS:
            return _plain(405, headers=(_ALLOW,))
        return await handler()

    async def _healthz(self) -> _Response:
        report = await run_checks(self._checks)
        # Degraded still serves traffic: only Unhealthy takes the host out of rotation.
        status = 503 if report.status == "Unhealthy" else 200
        return _Response(status, render_report(report), _JSON)

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
            ("Cache-Control", "no-store, no-cache"),
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


def _plain(status: int, *, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, f"{HTTPStatus(status).phrase}\n".encode(), _TEXT, headers)


async def _send(conn: h11.Connection, stream: trio.abc.SendStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)
