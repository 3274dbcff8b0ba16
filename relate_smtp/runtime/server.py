"""serve(): one root nursery owning the listeners, the sessions and background work.

Shutdown follows SPEC §10: listeners close at once, sessions waiting for a command are
told 421 4.3.2 at once, messages in flight get ``Smtp:ShutdownTimeoutSeconds`` to
finish, then background queues drain.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import attrs
import trio
from prometheus_client import CollectorRegistry

from relate_smtp.config import Settings, is_host_name
from relate_smtp.handlers.auth import Authenticator, LastUsedUpdater
from relate_smtp.handlers.budget import MemoryBudget
from relate_smtp.handlers.delivery import MessageDelivery, NewMailListener
from relate_smtp.handlers.notify import Notifier
from relate_smtp.handlers.parsing import MessageParser
from relate_smtp.handlers.policy import MailboxFilter
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import TOO_MANY_CONNECTIONS
from relate_smtp.runtime import checks
from relate_smtp.runtime.addresses import plain_address
from relate_smtp.runtime.health import HealthBindError, HealthServer
from relate_smtp.runtime.limits import ConnectionLimiter
from relate_smtp.runtime.listeners import StartupError, bind_socket, plan_listeners
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.runtime.proxy import ProxyProtocolError, is_trusted, read_proxy_header
from relate_smtp.runtime.session import Listener, Services, Session, Timeouts
from relate_smtp.runtime.spool import Spool
from relate_smtp.runtime.streams import PrefixedStream
from relate_smtp.runtime.tls import certificate_status
from relate_smtp.storage import Store

log = logging.getLogger("relate_smtp.server")
# Start-up and shutdown lines that scripts parse: kept visible at any log level.
lifecycle = logging.getLogger("relate_smtp.lifecycle")

# Background queues get at least this long to drain, even when messages in flight used
# up the shutdown budget.
_MIN_DRAIN = 1.0


@attrs.frozen(kw_only=True)
class BoundListener:
    name: str
    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"


class Server:
    """An SMTP server for one set of settings; ``serve`` runs it until ``shutdown``."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        tls_context: Callable[[], ssl.SSLContext | None] = lambda: None,
        certificate_health: Callable[[], checks.StatusLike] | None = None,
        metrics: Metrics | None = None,
        new_mail_listener: NewMailListener | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self._tls_context = tls_context
        self._certificate_health = certificate_health or (
            lambda: certificate_status(None, datetime.now(UTC))
        )
        self.notifier = Notifier(
            settings.api.base_url,
            settings.internal_api_key,
            timeout=settings.api.timeout_seconds,
        )
        self._shutdown = trio.Event()
        self._sessions: set[Session] = set()
        self._preambles: set[trio.CancelScope] = set()
        smtp = settings.smtp
        self._limiter = ConnectionLimiter(
            max_total=smtp.max_connections,
            max_per_ip=smtp.max_connections_per_ip,
            exempt=smtp.connection_limit_exempt_networks,
            ipv6_prefix_length=smtp.client_ipv6_prefix_length,
        )
        self.budget = MemoryBudget(smtp.max_buffered_bytes, on_change=self.metrics.buffer_changed)
        self.metrics.safely(lambda: self.metrics.buffer_budget.set(smtp.max_buffered_bytes))
        self.spool = Spool(settings.storage.spool_path, threshold=smtp.spool_threshold_bytes)
        self.last_used = LastUsedUpdater(store)
        self.authenticator = Authenticator(
            store,
            settings.security,
            last_used=self.last_used,
            ipv6_prefix_length=smtp.client_ipv6_prefix_length,
        )
        self.services = Services(
            store=store,
            authenticator=self.authenticator,
            mailbox_filter=MailboxFilter(
                store=store,
                mx_enabled=smtp.mx.enabled,
                hosted_domains=frozenset(smtp.mx.hosted_domains),
                validate_recipients=smtp.mx.validate_recipients,
                restrict_sender_to_login=smtp.restrict_sender_to_login,
            ),
            delivery=MessageDelivery(
                store,
                budget=self.budget,
                parser=MessageParser(
                    max_attachment_size=smtp.max_attachment_size_bytes,
                    mime_limits=smtp.mime.limits,
                    parse_limits=smtp.mime.parse,
                ),
                discard=settings.storage.discard_messages,
                metrics=self.metrics,
                listener=new_mail_listener or self.notifier,
            ),
            metrics=self.metrics,
            timeouts=Timeouts(
                command=smtp.command_timeout_seconds,
                data=smtp.data_timeout_seconds,
                min_data_rate=smtp.min_data_rate_bytes_per_second,
                tls_handshake=smtp.tls_handshake_timeout_seconds,
            ),
            tls_context=tls_context,
            spool=self.spool,
        )

    # ---- listeners ------------------------------------------------------------------

    def listeners(self) -> list[tuple[Listener, int]]:
        """The endpoints these settings open, with their configured ports."""
        return plan_listeners(self.settings, has_certificate=self._tls_context() is not None)

    # ---- running --------------------------------------------------------------------

    def shutdown(self) -> None:
        """Begin the graceful shutdown of SPEC §10 (idempotent)."""
        self._shutdown.set()

    async def serve(
        self,
        *,
        sockets: Mapping[ListenerKind, Sequence[socket.socket]] | None = None,
        health: bool = True,
        task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown`; ``started()`` reports every bound endpoint.

        ``sockets`` are listening sockets bound by a supervising parent (``--workers``);
        without them the server binds its own. ``health=False`` leaves /healthz and
        /metrics to that parent.
        """
        smtp = self.settings.smtp
        if health:
            log_start(self.settings)
        self.spool.remove_leftovers()
        async with trio.open_nursery() as background:
            await background.start(self.last_used.run)
            await background.start(self.notifier.run)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as listening:
                    bound: list[BoundListener] = []
                    for listener, port in self.listeners():
                        if sockets is None:
                            own = [bind_socket(listener.kind, port)]
                        else:
                            own = list(sockets.get(listener.kind, ()))
                        bound.extend(describe(listener, own))
                        trio_listeners = [
                            trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                            for sock in own
                        ]
                        listening.start_soon(
                            functools.partial(
                                trio.serve_listeners,
                                functools.partial(self._handle, listener),
                                trio_listeners,
                                handler_nursery=handlers,
                            )
                        )
                    if health:
                        probe = health_checks(
                            self.settings,
                            self.store,
                            submission_port=bound[0].port,
                            certificate_health=self._certificate_health,
                        )
                        bound.extend(
                            await start_health_server(
                                background, self.settings, probe, self.metrics.registry
                            )
                        )
                        log_bound(bound)
                    task_status.started(bound)
                    await self._shutdown.wait()
                    lifecycle.info("Shutting down: listeners closed")
                    listening.cancel_scope.cancel()
                for preamble in list(self._preambles):
                    preamble.cancel()
                for session in list(self._sessions):
                    session.request_shutdown()
                # One budget for everything that may still finish: messages in flight,
                # then the background queues (SPEC §10: well within 30 s in all).
                deadline = trio.current_time() + smtp.shutdown_timeout_seconds
                handlers.cancel_scope.deadline = deadline
            with trio.move_on_at(deadline):
                await self.last_used.aclose()
            await self.notifier.aclose(max(deadline - trio.current_time(), _MIN_DRAIN))
            background.cancel_scope.cancel()
        lifecycle.info("Shutdown complete")

    async def _handle(self, listener: Listener, socket_stream: trio.SocketStream) -> None:
        try:
            peer = socket_stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(socket_stream)
            return
        client = (plain_address(str(peer[0])), int(peer[1]))
        stream: trio.abc.Stream = socket_stream
        if listener.proxy_protocol:
            # Tracked so that shutdown can interrupt a peer that never sends its header.
            with trio.CancelScope() as preamble:
                self._preambles.add(preamble)
                if self._shutdown.is_set():
                    preamble.cancel()
                try:
                    real = await self._read_proxy_header(listener, socket_stream, client)
                finally:
                    self._preambles.discard(preamble)
            if preamble.cancelled_caught or real is None:
                await trio.aclose_forcefully(socket_stream)
                return
            client, stream = real
        if not self._limiter.try_acquire(client[0]):
            self.metrics.reject("too_many_connections")
            log.info("refused %s on %s: too many connections", client[0], listener.name)
            if listener.implicit_tls:
                # A plaintext 421 would be garbage to a client starting TLS, and a
                # handshake is work an overloaded server should not do: just close.
                await trio.aclose_forcefully(stream)
                return
            with (
                trio.move_on_after(5),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(TOO_MANY_CONNECTIONS.render())
            await trio.aclose_forcefully(stream)
            return
        session = Session(stream, client=client, listener=listener, services=self.services)
        self._sessions.add(session)
        try:
            if self._shutdown.is_set():
                session.request_shutdown()
            await session.run()
        finally:
            self._sessions.discard(session)
            self._limiter.release(client[0])

    async def _read_proxy_header(
        self, listener: Listener, stream: trio.SocketStream, peer: tuple[str, int]
    ) -> tuple[tuple[str, int], trio.abc.Stream] | None:
        """The real client behind a trusted load balancer, and the stream to go on with;
        None (after one log line) when the peer may not or did not send a valid header."""
        networks = self.settings.smtp.proxy_protocol.trusted_networks
        if not is_trusted(peer[0], networks):
            self.metrics.reject("proxy_untrusted")
            log.warning(
                "closed %s on %s: not in Smtp:ProxyProtocol:TrustedNetworks", peer[0], listener.name
            )
            return None
        try:
            header, rest = await read_proxy_header(
                stream, timeout=self.settings.smtp.tls_handshake_timeout_seconds
            )
        except ProxyProtocolError as exc:
            self.metrics.reject("proxy_header")
            log.info("closed %s on %s: %s", peer[0], listener.name, exc)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("%s on %s hung up before its PROXY header", peer[0], listener.name)
            return None
        client = header.client or peer
        return client, PrefixedStream(stream, rest) if rest else stream


def describe(listener: Listener, sockets: Sequence[socket.socket]) -> list[BoundListener]:
    """How a listener's sockets are announced in the ``Listening:`` lines."""
    if listener.implicit_tls:
        mode = "implicit"
    elif listener.protocol.tls_available:
        mode = "starttls"
    else:
        mode = "none"
    result = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        result.append(BoundListener(name=listener.name, host=host, port=port, tls=mode))
    return result


def log_bound(bound: Sequence[BoundListener]) -> None:
    for item in bound:
        where = endpoint(item.host, item.port)
        lifecycle.info("Listening: %s on %s (%s)", item.name, where, item.tls)


def endpoint(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (``[::]:2525``) so the port is unambiguous
    (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def store_directory(settings: Settings) -> str:
    """The directory whose disk the disk-space check watches."""
    if settings.default_connection:
        return "."
    return os.path.dirname(os.path.abspath(settings.storage.sqlite_path))


def health_checks(
    settings: Settings,
    store: Store,
    *,
    submission_port: int,
    certificate_health: Callable[[], checks.StatusLike],
) -> list[checks.HealthCheck]:
    """SPEC §7's checks, in the original's registration order, which is its JSON's."""
    health = settings.health_check
    probe = [
        checks.database_check(store),
        checks.disk_space_check(store_directory(settings)),
        checks.memory_check(),
        checks.connection_pool_check(store),
        checks.smtp_check(
            "127.0.0.1",
            submission_port,
            proxy_local=ListenerKind.SUBMISSION.value in settings.smtp.proxy_protocol.listeners,
        ),
    ]
    if health.dns_mx_domain:
        probe.append(checks.dns_mx_check(health.dns_mx_domain))
    probe.append(checks.certificate_check(certificate_health))
    return probe


async def start_health_server(
    nursery: trio.Nursery,
    settings: Settings,
    probe: Sequence[checks.HealthCheck],
    registry: CollectorRegistry,
) -> list[BoundListener]:
    """/healthz and /metrics on every endpoint of ``HealthCheck:Url``."""
    server = HealthServer(settings.health_check.endpoints, probe, registry)
    try:
        bound = await nursery.start(server.serve)
    except HealthBindError as exc:
        raise StartupError("HealthCheck:Url", str(exc)) from None
    return [BoundListener(name="health", host=host, port=port, tls="none") for host, port in bound]


def log_start(settings: Settings, *, workers: int = 1) -> None:
    """The original host's start-up lines, and the open-sink warning."""
    smtp = settings.smtp
    processes = f" with {workers} workers" if workers > 1 else ""
    if smtp.secure_port > 0:
        lifecycle.info(
            "Starting SMTP server on port %d (plain) and %d (TLS)%s",
            smtp.port,
            smtp.secure_port,
            processes,
        )
    else:
        lifecycle.info("Starting SMTP server on port %d (plain)%s", smtp.port, processes)
    if smtp.mx.enabled:
        lifecycle.info(
            "MX endpoint enabled on port %d for domains: %s",
            smtp.mx.port,
            ", ".join(smtp.mx.hosted_domains),
        )
    if not is_host_name(smtp.server_name):
        log.warning(
            "Smtp:ServerName %r is not a domain name; clients see it in the greeting "
            "and EHLO reply, where RFC 5321 expects one",
            smtp.server_name,
        )
    if smtp.require_authentication and not smtp.allow_insecure_auth and not smtp.certificate_path:
        log.warning(
            "Smtp:AllowInsecureAuth is false and no certificate is configured: AUTH is "
            "never offered, so the submission listener cannot accept mail"
        )
    if not smtp.require_authentication and not smtp.mx.enabled:
        log.warning(
            "Smtp:RequireAuthentication is false: the submission listener accepts "
            "mail from anyone (open sink)"
        )
