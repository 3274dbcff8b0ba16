"""Binding ``HealthCheck:Url``'s endpoints the way Kestrel binds them."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from typing import Final

log = logging.getLogger("relate_smtp.health")

ANY_HOST: Final = "::"
LOCALHOST: Final = "localhost"
# A free port for 127.0.0.1 may be taken on ::1; so many tries to find one free on both.
_LOOPBACK_PORT_TRIES: Final = 5
# What binding ::1 raises on a host without IPv6: serve IPv4 alone, as Kestrel does.
_NO_IPV6: Final = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


class HealthBindError(OSError):
    """The health listener could not be bound; ``port`` is the configured port."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(f"cannot listen on port {port}: {reason}")
        self.errno = cause.errno
        self.host = host
        self.port = port


def bind_endpoints(endpoints: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """Listening sockets for ``HealthCheck:Url``'s endpoints, bound the way Kestrel binds
    them, so a probe that reached the original over IPv4 or IPv6 reaches this one too.

    Raises :class:`HealthBindError` (with nothing left open) when one cannot be bound.
    """
    sockets: list[socket.socket] = []
    try:
        for host, port in endpoints:
            sockets.extend(_bind(host, port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(host: str, port: int) -> list[socket.socket]:
    try:
        if host == ANY_HOST:
            return [_bind_any(port)]
        if host == LOCALHOST:
            return _bind_loopbacks(port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [socket.create_server((host, port), family=family)]
    except OSError as exc:
        raise HealthBindError(host, port, exc) from exc


def _bind_any(port: int) -> socket.socket:
    """Every interface: one dual-stack socket (Kestrel's IPv6Any with DualMode)."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("0.0.0.0", port))


def _bind_loopbacks(port: int) -> list[socket.socket]:
    """``localhost``: 127.0.0.1 and ::1 on one port; IPv4 alone where there is no IPv6."""
    for _ in range(_LOOPBACK_PORT_TRIES if port == 0 else 1):
        first = socket.create_server(("127.0.0.1", port))
        try:
            second = socket.create_server(("::1", first.getsockname()[1]), family=socket.AF_INET6)
        except OSError as exc:
            if exc.errno in _NO_IPV6:
                log.warning("HealthCheck:Url: localhost is served on 127.0.0.1 only: %s", exc)
                return [first]
            first.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue
            raise
        return [first, second]
    raise OSError(errno.EADDRINUSE, "no port free on both 127.0.0.1 and ::1")


def host_and_port(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)
