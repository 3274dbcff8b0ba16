"""The original's telemetry names, in one place (``TelemetryConfiguration.cs``,
``ProtocolMetrics.cs`` and the handlers' ``StartActivity``/``SetTag`` calls).

A collector's dashboards and alerts select on these strings, so they are the original's
exactly; the few this server adds (the session, the database write, its outcome tags)
follow OpenTelemetry's semantic conventions where one applies.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

SERVICE_NAME: Final = "relate-mail-smtp"
"""``AddRelateTelemetry(…, "relate-mail-smtp")`` in SmtpHost's Program.cs."""

SCOPE: Final = "Relate.Smtp"
"""The original's ActivitySource and Meter for SMTP (both version 1.0.0)."""
SCOPE_VERSION: Final = "1.0.0"


@attrs.frozen
class _Spans:
    session: str = "smtp.session"
    """Ours: one per connection, the parent of the rest, so a trace is a connection."""
    auth: str = "smtp.auth.validate"
    mail_from: str = "smtp.filter.mail_from"
    rcpt_to: str = "smtp.filter.rcpt_to"
    save: str = "smtp.message.save"
    parse: str = "smtp.message.parse"
    notify: str = "smtp.notify.users"
    sender_auth: str = "smtp.sender_auth"
    """Ours (issue 15): SPF, DKIM and DMARC of one MX message, results as attributes."""
    commit: str = "db.commit"
    """Ours: the group commit's transaction, under each message's ``smtp.message.save``."""


SPANS: Final = _Spans()


@attrs.frozen
class _Tags:
    # The original's (MxMailboxFilter, CustomMessageStore, ProtocolAuthenticator).
    sender: str = "smtp.from"
    recipient: str = "smtp.to"
    endpoint_port: str = "smtp.endpoint_port"
    is_authenticated: str = "smtp.is_authenticated"
    relay_rejected: str = "smtp.relay_rejected"
    unknown_recipient: str = "smtp.unknown_recipient"
    buffer_size: str = "smtp.buffer_size"
    size_bytes: str = "smtp.size_bytes"
    recipients_count: str = "smtp.recipients_count"
    message_id: str = "smtp.message_id"
    thread_id: str = "smtp.thread_id"
    has_attachments: str = "smtp.has_attachments"
    recipient_count: str = "smtp.recipient_count"
    auth_user: str = "smtp.auth.user"
    auth_success: str = "smtp.auth.success"
    auth_rate_limited: str = "smtp.auth.rate_limited"
    exception_type: str = "exception.type"
    exception_message: str = "exception.message"
    # Ours.
    listener: str = "smtp.listener"
    tls: str = "smtp.tls"
    messages: str = "smtp.messages"
    outcome: str = "smtp.outcome"
    refused: str = "smtp.refused"
    client_address: str = "client.address"
    client_port: str = "client.port"
    db_system: str = "db.system"
    db_operation: str = "db.operation.name"
    batch_size: str = "db.operation.batch.size"
    batch_leader: str = "relate.batch.leader"


TAGS: Final = _Tags()

InstrumentKind = Literal["counter", "histogram", "up_down_counter"]


@attrs.frozen(kw_only=True)
class Instrument:
    name: str
    unit: str
    description: str
    kind: InstrumentKind


MESSAGES_RECEIVED: Final = Instrument(
    name="smtp.messages.received",
    unit="messages",
    description="Total messages received via SMTP",
    kind="counter",
)
BYTES_RECEIVED: Final = Instrument(
    name="smtp.bytes.received",
    unit="bytes",
    description="Total bytes received via SMTP",
    kind="counter",
)
AUTH_ATTEMPTS: Final = Instrument(
    name="smtp.auth.attempts",
    unit="attempts",
    description="SMTP authentication attempts",
    kind="counter",
)
AUTH_FAILURES: Final = Instrument(
    name="smtp.auth.failures",
    unit="failures",
    description="SMTP authentication failures",
    kind="counter",
)
PROCESSING_DURATION: Final = Instrument(
    name="smtp.message.processing.duration",
    unit="ms",
    description="Time to process SMTP message",
    kind="histogram",
)
CONNECTIONS_ACTIVE: Final = Instrument(
    name="smtp.connections.active",
    unit="connections",
    description="Active SMTP connections",
    kind="up_down_counter",
)

INSTRUMENTS: Final = (
    MESSAGES_RECEIVED,
    BYTES_RECEIVED,
    AUTH_ATTEMPTS,
    AUTH_FAILURES,
    PROCESSING_DURATION,
    CONNECTIONS_ACTIVE,
)
"""ProtocolMetrics.cs's SMTP instruments (the POP3 and IMAP ones belong to other hosts)."""
