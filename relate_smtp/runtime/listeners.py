"""Which SMTP endpoints the settings open, binding their sockets, and how the bound
endpoints are named.

Kept apart from the server so that a supervising parent (``serve --workers N``) can bind
the same sockets its workers then inherit.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import attrs

from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import ProtocolConfig
from relate_smtp.runtime.accept import set_connection_options

log = logging.getLogger("relate_smtp.server")

PORT_KEYS = {
    ListenerKind.SUBMISSION: "Smtp:Port",
    ListenerKind.SUBMISSION_TLS: "Smtp:SecurePort",
    ListenerKind.MX: "Smtp:Mx:Port",
}

# The kernel caps this at net.core.somaxconn; ask for as much as it allows.
_BACKLOG = 65535


@attrs.frozen(kw_only=True)
class Listener:
    """One listening endpoint: its name, kind, TLS mode and the core's settings."""

    kind: ListenerKind
    protocol: ProtocolConfig
    implicit_tls: bool = False
    proxy_protocol: bool = False

    @property
    def name(self) -> str:
        return self.kind.value


@attrs.frozen(kw_only=True)
class BoundListener:
    """An endpoint as the ``Listening:`` lines and ``task_status.started`` report it."""

    name: str
    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"


class StartupError(Exception):
    """Start-up cannot go on; ``key`` names the setting at fault (exit status 2)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def plan_listeners(settings: Settings, *, has_certificate: bool) -> list[tuple[Listener, int]]:
    """The endpoints these settings open, with their configured ports (SPEC §1)."""
    smtp = settings.smtp
    base = ProtocolConfig(
        hostname=smtp.server_name,
        max_message_size=smtp.max_message_size_bytes,
        max_recipients=smtp.max_recipients,
        max_errors=smtp.max_errors,
        max_recipient_errors=smtp.max_recipient_errors,
        bare_line_endings=smtp.bare_line_endings,
        auth_required=smtp.require_authentication,
        allow_insecure_auth=smtp.allow_insecure_auth,
    )
    proxied = set(smtp.proxy_protocol.listeners)

    def listener(kind: ListenerKind, protocol: ProtocolConfig, **kwargs: bool) -> Listener:
        return Listener(kind=kind, protocol=protocol, proxy_protocol=kind in proxied, **kwargs)

    result = [
        (
            listener(ListenerKind.SUBMISSION, attrs.evolve(base, tls_available=has_certificate)),
            smtp.port,
        )
    ]
    if smtp.secure_port > 0:
        if has_certificate:
            result.append(
                (
                    listener(
                        ListenerKind.SUBMISSION_TLS,
                        attrs.evolve(base, tls_active=True),
                        implicit_tls=True,
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
        result.append((listener(ListenerKind.MX, mx_protocol(base, has_certificate)), smtp.mx.port))
    return result


def mx_protocol(base: ProtocolConfig, has_certificate: bool) -> ProtocolConfig:
    """Port 25: AUTH is optional and only ever over TLS, as in the original, whose one
    authenticator served every endpoint but allowed plaintext AUTH on 587 alone. Without
    a certificate TLS never starts, so AUTH is not a command there at all."""
    return attrs.evolve(
        base,
        tls_available=has_certificate,
        auth_enabled=has_certificate,
        auth_required=False,
        allow_insecure_auth=False,
    )


def bind_socket(kind: ListenerKind, port: int) -> socket.socket:
    """A listening TCP socket on every interface: one dual-stack socket where the host
    supports it (so port 0 gives one port for IPv4 and IPv6), else IPv4."""
    try:
        if socket.has_dualstack_ipv6():
            listening = socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=_BACKLOG
            )
        else:
            listening = socket.create_server(("0.0.0.0", port), backlog=_BACKLOG)
        set_connection_options(listening)
        return listening
    except OSError as exc:
        raise StartupError(
            PORT_KEYS[kind], f"cannot listen on port {port}: {exc.strerror or exc}"
        ) from None


def bind_planned(
    plan: Sequence[tuple[Listener, int]],
) -> dict[ListenerKind, list[socket.socket]]:
    """One listening socket per planned endpoint; on failure none stays open."""
    bound: dict[ListenerKind, list[socket.socket]] = {}
    try:
        for listener, port in plan:
            bound[listener.kind] = [bind_socket(listener.kind, port)]
    except StartupError:
        close_all(bound)
        raise
    return bound


def close_all(sockets: dict[ListenerKind, list[socket.socket]]) -> None:
    for socks in sockets.values():
        for sock in socks:
            sock.close()


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


def endpoint(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (``[::]:2525``) so the port is unambiguous
    (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
