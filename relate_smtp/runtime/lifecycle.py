"""The start-up and shutdown lines that operators and scripts read (SPEC §1).

One home for them, so the single process and the ``--workers`` parent say the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relate_smtp.config import Settings, is_host_name
from relate_smtp.runtime.listeners import BoundListener, endpoint

log = logging.getLogger("relate_smtp.server")
# Start-up and shutdown lines that scripts parse: kept visible at any log level.
lifecycle = logging.getLogger("relate_smtp.lifecycle")


def log_bound(bound: Sequence[BoundListener]) -> None:
    for item in bound:
        where = endpoint(item.host, item.port)
        lifecycle.info("Listening: %s on %s (%s)", item.name, where, item.tls)


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
