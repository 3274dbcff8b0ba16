"""ProtocolConfig: what one listener offers and the limits that bound each connection.

Every default is a named constant with the reason for its value, so a limit has one
home and one justification.
"""

from __future__ import annotations

import enum

import attrs

DEFAULT_HOSTNAME = "localhost"
# 50 MiB, advertised as SIZE (RFC 1870); large enough for ordinary mail with attachments.
MAX_MESSAGE_SIZE = 52_428_800
# RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
MAX_RECIPIENTS = 100
# Protocol errors tolerated before the core answers 421 and closes: a client that keeps
# sending garbage is broken or probing, and each error costs a reply.
MAX_ERRORS = 10
# Rejected recipients tolerated since the last accepted message before 421, as Postfix's
# smtpd_hard_error_limit (20) counts them: without a cap one connection can probe
# thousands of addresses. Kept apart from MAX_ERRORS, and cleared by each accepted
# message, so a mailing list with a few stale addresses per message is never cut off.
MAX_RECIPIENT_ERRORS = 20
# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including the CRLF.
MAX_COMMAND_LINE = 512
# What each advertised extension adds to the MAIL line (RFC 5321 §4.5.3.1.4 lets
# extensions raise the limit). RCPT gets nothing: no extension offered here (DSN is
# not) defines a RCPT parameter.
SIZE_ALLOWANCE = 26  # RFC 1870 §3 (5)
AUTH_ALLOWANCE = 500  # RFC 4954 §3 (5), only while AUTH is offered on the channel
SMTPUTF8_ALLOWANCE = 10  # RFC 6531 §3.1 (5)
# RFC 6152 §2 and RFC 3030 §3 state no allowance for BODY=; without one a MAIL line at
# the base limit could not carry the parameter, so its longest form is allowed for.
BODY_ALLOWANCE = len(" BODY=BINARYMIME")
# RFC 4954 §4: an AUTH command or SASL response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288


class BareLineEndings(enum.Enum):
    """What a bare LF means, after Postfix 3.9's ``smtpd_forbid_bare_newline``.

    Whatever the mode, only CRLF.CRLF ends DATA and a bare CR is never a line end.
    """

    #: A bare LF ends a command or data line and is stored as CRLF.
    NORMALIZE = "normalize"
    #: A bare LF is refused: 500 for a command, 550 for a message after its real end.
    REJECT = "reject"


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _hostname(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"hostname must be one non-empty word, got {value!r}")


@attrs.frozen(kw_only=True, cache_hash=True)
class ProtocolConfig:
    """What a listener advertises and enforces; one instance is shared by its connections.

    ``max_message_size`` 0 means no limit (advertised as a bare ``SIZE``).
    Authentication is required before MAIL only when both ``auth_enabled`` and
    ``auth_required`` are true, so an MX listener sets ``auth_required=False``.
    With ``allow_insecure_auth`` false, AUTH is neither advertised nor accepted until
    TLS is active. BINARYMIME is only offered together with CHUNKING (RFC 3030 §3).
    ``max_recipient_errors`` counts the application's RCPT refusals apart from the
    peer's protocol errors (``max_errors``): a refused recipient is not a broken client,
    but thousands of them on one connection are a directory harvest.
    """

    hostname: str = attrs.field(default=DEFAULT_HOSTNAME, validator=_hostname)
    max_message_size: int = attrs.field(default=MAX_MESSAGE_SIZE, validator=_non_negative)
    max_recipients: int = attrs.field(default=MAX_RECIPIENTS, validator=_positive)
    max_errors: int = attrs.field(default=MAX_ERRORS, validator=_non_negative)
    max_recipient_errors: int = attrs.field(default=MAX_RECIPIENT_ERRORS, validator=_non_negative)
    max_command_line: int = attrs.field(default=MAX_COMMAND_LINE, validator=_positive)
    max_auth_line: int = attrs.field(default=MAX_AUTH_LINE, validator=_positive)
    auth_enabled: bool = True
    auth_required: bool = True
    allow_insecure_auth: bool = True
    tls_available: bool = False
    tls_active: bool = False
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    binarymime: bool = True
    bare_line_endings: BareLineEndings = BareLineEndings.NORMALIZE

    def auth_offered(self, *, tls_active: bool) -> bool:
        """Whether AUTH may be advertised and used on a channel in this TLS state."""
        return self.auth_enabled and (self.allow_insecure_auth or tls_active)

    @property
    def binarymime_offered(self) -> bool:
        return self.chunking and self.binarymime

    def mail_line_limit(self, *, tls_active: bool) -> int:
        """The MAIL line limit: the command line plus each advertised extension's share."""
        limit = self.max_command_line + SIZE_ALLOWANCE  # SIZE is always advertised
        if self.auth_offered(tls_active=tls_active):
            limit += AUTH_ALLOWANCE
        if self.smtputf8:
            limit += SMTPUTF8_ALLOWANCE
        if self.eightbitmime or self.binarymime_offered:
            limit += BODY_ALLOWANCE
        return limit
