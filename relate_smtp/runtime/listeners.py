"""Which SMTP endpoints the settings open, and binding their sockets.

Kept apart from the server so that a supervising parent (``serve --workers N``) can bind
the same sockets its workers then inherit.
"""

from __future__ import annotations

import logging
import socket

import attrs

from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import BareLineEndings, ProtocolConfig
from relate_smtp.runtime.session import Listener

log = logging.getLogger("relate_smtp.server")

PORT_KEYS = {
    ListenerKind.SUBMISSION: "Smtp:Port",
    ListenerKind.SUBMISSION_TLS: "Smtp:SecurePort",
    ListenerKind.MX: "Smtp:Mx:Port",
}

# The kernel caps this at net.core.somaxconn; ask for as much as it allows.
_BACKLOG = 65535


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
        bare_line_endings=BareLineEndings(smtp.bare_line_endings),
        auth_required=smtp.require_authentication,
        allow_insecure_auth=smtp.allow_insecure_auth,
    )
    proxied = set(smtp.proxy_protocol.listeners)

    def listener(kind: ListenerKind, protocol: ProtocolConfig, **kwargs: bool) -> Listener:
        return Listener(
            kind=kind, protocol=protocol, proxy_protocol=kind.value in proxied, **kwargs
        )

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
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=_BACKLOG
            )
        return socket.create_server(("0.0.0.0", port), backlog=_BACKLOG)
    except OSError as exc:
        raise StartupError(
            PORT_KEYS[kind], f"cannot listen on port {port}: {exc.strerror or exc}"
        ) from None
