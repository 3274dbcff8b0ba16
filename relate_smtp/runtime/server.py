"""serve(): one root nursery owning the listeners, the sessions and background work.

Shutdown follows SPEC §10: listeners close at once, sessions waiting for a command are
told 421 4.3.2 at once, messages in flight get ``Smtp:ShutdownTimeoutSeconds`` to
finish, then background queues drain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import trio

from relate_smtp.config import Settings
from relate_smtp.handlers.auth import Authenticator, LastUsedUpdater
from relate_smtp.handlers.delivery import MessageDelivery, NewMailListener
from relate_smtp.handlers.notify import Notifier
from relate_smtp.handlers.policy import ListenerKind, MailboxFilter
from relate_smtp.protocol import TOO_MANY_CONNECTIONS, BareLineEndings, ProtocolConfig
from relate_smtp.runtime import checks
from relate_smtp.runtime.health import HealthBindError, HealthServer
from relate_smtp.runtime.limits import ConnectionLimiter
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.runtime.proxy import ProxyProtocolError, is_trusted, read_proxy_header
from relate_smtp.runtime.session import Listener, Services, Session, Timeouts
from relate_smtp.runtime.streams import PrefixedStream
from relate_smtp.runtime.tls import certificate_status
from relate_smtp.storage import Store

log = logging.getLogger("relate_smtp.server")
# Start-up and shutdown lines that scripts parse: kept visible at any log level.
lifecycle = logging.getLogger("relate_smtp.lifecycle")


class StartupError(Exception):
    """Start-up cannot go on; ``key`` names the setting at fault (exit status 2)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@attrs.frozen(kw_only=True)
class BoundListener:
    name: str
    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"


_PORT_KEYS = {
    ListenerKind.SUBMISSION: "Smtp:Port",
    ListenerKind.SUBMISSION_TLS: "Smtp:SecurePort",
    ListenerKind.MX: "Smtp:Mx:Port",
}


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
        smtp = settings.smtp
        self._limiter = ConnectionLimiter(
            max_total=smtp.max_connections,
            max_per_ip=smtp.max_connections_per_ip,
            exempt=smtp.connection_limit_exempt_networks,
        )
        self.last_used = LastUsedUpdater(store)
        self.authenticator = Authenticator(store, settings.security, last_used=self.last_used)
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
                max_attachment_size=smtp.max_attachment_size_bytes,
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
        )

    # ---- listeners ------------------------------------------------------------------

    def listeners(self) -> list[tuple[Listener, int]]:
        """The endpoints these settings open, with their configured ports."""
        smtp = self.settings.smtp
        has_cert = self._tls_context() is not None
        base = ProtocolConfig(
            hostname=smtp.server_name,
            max_message_size=smtp.max_message_size_bytes,
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            bare_line_endings=BareLineEndings(smtp.bare_line_endings),
            auth_required=smtp.require_authentication,
            allow_insecure_auth=smtp.allow_insecure_auth,
        )
        proxied = set(smtp.proxy_protocol.listeners)
        result = [
            (
                Listener(
                    kind=ListenerKind.SUBMISSION,
                    protocol=attrs.evolve(base, tls_available=has_cert),
                    proxy_protocol=ListenerKind.SUBMISSION.value in proxied,
                ),
                smtp.port,
            )
        ]
        if smtp.secure_port > 0:
            if has_cert:
                result.append(
                    (
                        Listener(
                            kind=ListenerKind.SUBMISSION_TLS,
                            protocol=attrs.evolve(base, tls_active=True),
                            implicit_tls=True,
                            proxy_protocol=ListenerKind.SUBMISSION_TLS.value in proxied,
                        ),
                        smtp.secure_port,
                    )
                )
            else:
                log.warning(
                    "Smtp:SecurePort is %d but no certificate is configured "
                    "(Smtp:CertificatePath): the implicit TLS listener is not opened",
                    smtp.secure_port,
                )
        if smtp.mx.enabled:
            result.append(
                (
                    Listener(
                        kind=ListenerKind.MX,
                        protocol=attrs.evolve(
                            base,
                            tls_available=has_cert,
                            auth_enabled=False,
                            auth_required=False,
                        ),
                        proxy_protocol=ListenerKind.MX.value in proxied,
                    ),
                    smtp.mx.port,
                )
            )
        return result

    async def _bind(self, kind: ListenerKind, port: int) -> list[trio.SocketListener]:
        try:
            if port == 0:
                # One free port for every address family would need two binds that may
                # disagree; "pick a free port" is for tests and embedding, so IPv4 only.
                return await trio.open_tcp_listeners(0, host="0.0.0.0")
            return await trio.open_tcp_listeners(port)
        except OSError as exc:
            raise StartupError(
                _PORT_KEYS[kind], f"cannot listen on port {port}: {exc.strerror or exc}"
            ) from None

    # ---- running --------------------------------------------------------------------

    def shutdown(self) -> None:
        """Begin the graceful shutdown of SPEC §10 (idempotent)."""
        self._shutdown.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        smtp = self.settings.smtp
        self._log_start()
        async with trio.open_nursery() as background:
            background.start_soon(self.last_used.run)
            await background.start(self.notifier.run)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as listening:
                    bound: list[BoundListener] = []
                    for listener, port in self.listeners():
                        sockets = await self._bind(listener.kind, port)
                        bound.extend(self._describe(listener, sockets))
                        listening.start_soon(self._accept_loop, listener, sockets, handlers)
                    bound.append(await self._start_health(background, bound))
                    for item in bound:
                        lifecycle.info(
                            "Listening: %s on %s:%d (%s)", item.name, item.host, item.port, item.tls
                        )
                    task_status.started(bound)
                    await self._shutdown.wait()
                    lifecycle.info("Shutting down: listeners closed")
                    listening.cancel_scope.cancel()
                for session in list(self._sessions):
                    session.request_shutdown()
                handlers.cancel_scope.deadline = trio.current_time() + smtp.shutdown_timeout_seconds
            await self.last_used.aclose()
            await self.notifier.aclose(smtp.shutdown_timeout_seconds)
            background.cancel_scope.cancel()
        lifecycle.info("Shutdown complete")

    async def _start_health(
        self, nursery: trio.Nursery, bound: list[BoundListener]
    ) -> BoundListener:
        health = self.settings.health_check
        submission = next(item for item in bound if item.name == ListenerKind.SUBMISSION.value)
        probe = [
            checks.database_check(self.store),
            checks.connection_pool_check(self.store),
            checks.disk_space_check(self._store_path()),
            checks.memory_check(),
            checks.smtp_check(
                "127.0.0.1",
                submission.port,
                proxy_local=ListenerKind.SUBMISSION.value
                in self.settings.smtp.proxy_protocol.listeners,
            ),
        ]
        if health.dns_mx_domain:
            probe.append(checks.dns_mx_check(health.dns_mx_domain))
        probe.append(checks.certificate_check(self._certificate_health))
        server = HealthServer(health.host, health.port, probe, self.metrics.registry)
        try:
            host, port = await nursery.start(server.serve)
        except HealthBindError as exc:
            raise StartupError("HealthCheck:Url", str(exc)) from None
        return BoundListener(name="health", host=host, port=port, tls="none")

    def _store_path(self) -> str:
        if self.settings.default_connection:
            return "."
        return os.path.dirname(os.path.abspath(self.settings.storage.sqlite_path))

    async def _accept_loop(
        self,
        listener: Listener,
        sockets: list[trio.SocketListener],
        handlers: trio.Nursery,
    ) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            await self._handle(listener, stream)

        await trio.serve_listeners(handle, sockets, handler_nursery=handlers)

    async def _handle(self, listener: Listener, socket_stream: trio.SocketStream) -> None:
        try:
            peer = socket_stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(socket_stream)
            return
        client = (str(peer[0]), int(peer[1]))
        stream: trio.abc.Stream = socket_stream
        if listener.proxy_protocol:
            real = await self._read_proxy_header(listener, socket_stream, client)
            if real is None:
                await trio.aclose_forcefully(socket_stream)
                return
            client, stream = real
        if not self._limiter.try_acquire(client[0]):
            self.metrics.reject("too_many_connections")
            log.info("refused %s on %s: too many connections", client[0], listener.name)
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

    def _describe(
        self, listener: Listener, sockets: list[trio.SocketListener]
    ) -> list[BoundListener]:
        if listener.implicit_tls:
            mode = "implicit"
        elif listener.protocol.tls_available:
            mode = "starttls"
        else:
            mode = "none"
        result = []
        for sock in sockets:
            host, port = sock.socket.getsockname()[:2]
            result.append(BoundListener(name=listener.name, host=host, port=port, tls=mode))
        return result

    def _log_start(self) -> None:
        smtp = self.settings.smtp
        if smtp.secure_port > 0:
            lifecycle.info(
                "Starting SMTP server on port %d (plain) and %d (TLS)", smtp.port, smtp.secure_port
            )
        else:
            lifecycle.info("Starting SMTP server on port %d (plain)", smtp.port)
        if smtp.mx.enabled:
            lifecycle.info(
                "MX endpoint enabled on port %d for domains: %s",
                smtp.mx.port,
                ", ".join(smtp.mx.hosted_domains),
            )
        if not smtp.require_authentication and not smtp.mx.enabled:
            log.warning(
                "Smtp:RequireAuthentication is false: the submission listener accepts "
                "mail from anyone (open sink)"
            )
