"""serve(): one root nursery owning the listeners, the sessions and background work.

Shutdown follows SPEC §10: listeners close at once, sessions waiting for a command are
told 421 4.3.2 at once, messages in flight get ``Smtp:ShutdownTimeoutSeconds`` to
finish, then background queues drain.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from relate_smtp.addresses import plain_address
from relate_smtp.config import Settings
from relate_smtp.handlers.auth import Authenticator
from relate_smtp.handlers.budget import MemoryBudget
from relate_smtp.handlers.lastused import LastUsedUpdater
from relate_smtp.handlers.notify import Notifier
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import TOO_MANY_CONNECTIONS
from relate_smtp.runtime.accept import serve_socket
from relate_smtp.runtime.checks import HealthCheck
from relate_smtp.runtime.health import start_health_server
from relate_smtp.runtime.lifecycle import lifecycle, log_bound, log_start
from relate_smtp.runtime.limits import ConnectionLimiter
from relate_smtp.runtime.listeners import (
    BoundListener,
    Listener,
    bind_socket,
    describe,
    plan_listeners,
)
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.runtime.proxy import ProxyProtocolError, is_trusted, read_proxy_header
from relate_smtp.runtime.services import Services
from relate_smtp.runtime.session import Session
from relate_smtp.runtime.spool import Spool
from relate_smtp.runtime.streams import PlainStream, PrefixedStream

log = logging.getLogger("relate_smtp.server")

HealthChecks = Callable[[int], Sequence[HealthCheck]]
"""The /healthz checks, given the submission port the ``smtp`` check connects to."""

# The same few clients connect again and again: parse each address once.
_plain_address = functools.lru_cache(maxsize=4096)(plain_address)

# Background queues get at least this long to drain, even when messages in flight used
# up the shutdown budget.
_MIN_DRAIN = 1.0


class Server:
    """An SMTP server: its listeners, its sessions and their shutdown order.

    What the sessions use is built by the composition root (:mod:`relate_smtp.app`),
    which passes it in; the constructor only stores it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        services: Services,
        notifier: Notifier,
        last_used: LastUsedUpdater,
        budget: MemoryBudget,
        limiter: ConnectionLimiter,
        health_checks: HealthChecks,
    ) -> None:
        self.settings = settings
        self.services = services
        self.notifier = notifier
        self.last_used = last_used
        self.budget = budget
        self._limiter = limiter
        self._health_checks = health_checks
        self._shutdown = trio.Event()
        self._sessions: set[Session] = set()
        self._preambles: set[trio.CancelScope] = set()

    @property
    def metrics(self) -> Metrics:
        return self.services.metrics

    @property
    def spool(self) -> Spool:
        return self.services.spool

    @property
    def authenticator(self) -> Authenticator:
        return self.services.authenticator

    # ---- listeners ------------------------------------------------------------------

    def listeners(self) -> list[tuple[Listener, int]]:
        """The endpoints these settings open, with their configured ports."""
        has_certificate = self.services.tls_context() is not None
        return plan_listeners(self.settings, has_certificate=has_certificate)

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
            if self.services.sender_checks is not None:
                await background.start(self.services.sender_checks.run)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as listening:
                    bound: list[BoundListener] = []
                    for listener, port in self.listeners():
                        if sockets is None:
                            own = [bind_socket(listener.kind, port)]
                        else:
                            own = list(sockets.get(listener.kind, ()))
                        bound.extend(describe(listener, own))
                        handle = functools.partial(self._handle, listener)
                        for sock in own:
                            listening.start_soon(serve_socket, sock, handle, handlers)
                    if health:
                        bound.extend(
                            await start_health_server(
                                background,
                                self.settings.health_check.endpoints,
                                self._health_checks(bound[0].port),
                                self.metrics.registry,
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

    async def _handle(
        self, listener: Listener, socket_stream: PlainStream, peer: tuple[Any, ...]
    ) -> None:
        client = (_plain_address(peer[0]), int(peer[1]))
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
        self, listener: Listener, stream: PlainStream, peer: tuple[str, int]
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
