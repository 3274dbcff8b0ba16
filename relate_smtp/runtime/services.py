"""What every session of a server shares: the handlers it asks, its clocks, its TLS
context and its metrics. Built by the composition root (``relate_smtp.app``)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import attrs

from relate_smtp.config import SmtpSettings
from relate_smtp.handlers.auth import Authenticator
from relate_smtp.handlers.delivery import MessageDelivery
from relate_smtp.handlers.policy import MailboxFilter
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.runtime.sender_checks import SenderChecks
from relate_smtp.runtime.spool import DEFAULT_SPOOL_THRESHOLD, Spool
from relate_smtp.storage import Store

_SMTP = SmtpSettings()


@attrs.frozen(kw_only=True)
class Timeouts:
    """SPEC §2's session clocks, in seconds; the defaults are the settings' (``Smtp:*``)."""

    command: float = _SMTP.command_timeout_seconds
    data: float = _SMTP.data_timeout_seconds
    min_data_rate: int = _SMTP.min_data_rate_bytes_per_second
    tls_handshake: float = _SMTP.tls_handshake_timeout_seconds


@attrs.frozen(kw_only=True)
class Services:
    """Everything a session asks for a decision; shared by all sessions of a server."""

    store: Store
    authenticator: Authenticator
    mailbox_filter: MailboxFilter
    delivery: MessageDelivery
    metrics: Metrics
    timeouts: Timeouts
    tls_context: Callable[[], ssl.SSLContext | None]
    spool: Spool = attrs.field(factory=lambda: Spool(None, threshold=DEFAULT_SPOOL_THRESHOLD))
    #: SPF, DKIM and DMARC of unauthenticated MX mail; None when MX is off or they are.
    sender_checks: SenderChecks | None = None
