"""Every reply the core can send: the `Reply` type and each named reply.

All wording lives here, so a reply is never assembled ad hoc elsewhere. Enhanced
status codes (RFC 3463, announced as ENHANCEDSTATUSCODES per RFC 2034) are on every
2xx/4xx/5xx reply except the greeting and the HELO/EHLO replies (RFC 2034 §3);
RFC 3463 defines no class 3, so 334 and 354 carry none.
"""

from __future__ import annotations

import functools
import re

import attrs

from ._config import ProtocolConfig

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _render(code: int, enhanced: str | None, lines: tuple[str, ...]) -> bytes:
    prefix = f"{enhanced} " if enhanced is not None else ""
    last = len(lines) - 1
    # RFC 5321 §4.2.1: every line but the last has "-" after the code.
    return b"".join(
        f"{code}{' ' if i == last else '-'}{prefix}{text}\r\n".encode()
        for i, text in enumerate(lines)
    )


def _check_lines(instance: Reply, attribute: attrs.Attribute[object], value: object) -> None:
    if not isinstance(value, tuple) or not value:
        raise ValueError("a reply needs a non-empty tuple of lines")
    for line in value:
        if not isinstance(line, str) or "\r" in line or "\n" in line:
            raise ValueError(f"reply line must be a str without CR or LF: {line!r}")


@attrs.frozen
class Reply:
    """One SMTP reply; validated here because applications build their own.

    ``code`` is 200 to 599; ``enhanced`` is an RFC 3463 code whose class digit equals
    the first digit of ``code`` (or None); ``lines`` is one text per reply line.
    """

    code: int = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(int), attrs.validators.ge(200), attrs.validators.le(599)
        )
    )
    enhanced: str | None = attrs.field()
    lines: tuple[str, ...] = attrs.field(validator=_check_lines)
    _wire: bytes = attrs.field(init=False, repr=False, eq=False)

    @enhanced.validator
    def _check_enhanced(self, attribute: attrs.Attribute[object], value: str | None) -> None:
        if value is None:
            return
        if not isinstance(value, str) or _ENHANCED.fullmatch(value) is None:
            raise ValueError(f"not an RFC 3463 enhanced status code: {value!r}")
        if value[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {value} does not match reply code {self.code}")

    def __attrs_post_init__(self) -> None:
        # Rendered once: most replies are module constants sent many times.
        object.__setattr__(self, "_wire", _render(self.code, self.enhanced, self.lines))

    def render(self) -> bytes:
        """The reply as sent on the wire, CRLF-terminated, multi-line as needed."""
        return self._wire


class _Reject(Exception):
    """Raised by parsers and checks to answer a command with `reply` instead of an event.

    ``counted`` is False for refusals that are not the peer's mistake (a recipient over
    the limit is the protocol working as designed), so they never lead to 421.
    """

    def __init__(self, reply: Reply, *, counted: bool = True) -> None:
        super().__init__(reply)
        self.reply = reply
        self.counted = counted


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, (text,))


def _vouched(code: int, enhanced: str, text: str) -> Reply:
    """A one-line reply whose code and enhanced code this module chose, built without the
    validators (one is built per accepted message); only the text is checked."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"reply line must be a str without CR or LF: {text!r}")
    reply = object.__new__(Reply)
    object.__setattr__(reply, "code", code)
    object.__setattr__(reply, "enhanced", enhanced)
    object.__setattr__(reply, "lines", (text,))
    object.__setattr__(reply, "_wire", f"{code} {enhanced} {text}\r\n".encode())
    return reply


# --- replies the application chooses -------------------------------------------------
AUTH_SUCCEEDED = _r(235, "2.7.0", "Authentication successful")  # RFC 4954 §6
AUTH_FAILED = _r(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 §6
AUTH_TEMPORARY_FAILURE = _r(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")  # RFC 4954 §6
RELAY_DENIED = _r(550, "5.7.1", "Relay access denied")
UNKNOWN_USER = _r(550, "5.1.1", "No such user here")
SENDER_NOT_OWNED = _r(553, "5.7.1", "Sender address not owned by the authenticated user")
LOCAL_ERROR = _r(451, "4.3.0", "Temporary local problem, try again later")
MESSAGE_TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed maximum message size")  # RFC 1870
ATTACHMENT_TOO_BIG = _r(552, "5.3.4", "Attachment size exceeds the fixed maximum")
# A message that would take longer or more memory to parse than the limits allow.
# RFC 5321 §4.2.5 / RFC 3463 §3.4: no room (memory budget, spool disk) for the message now.
INSUFFICIENT_RESOURCES = _r(452, "4.3.1", "Insufficient system resources, try again later")
MESSAGE_TOO_COMPLEX_NOW = _r(451, "4.3.0", "Message too costly to process now, try again later")
SHUTTING_DOWN = _r(421, "4.3.2", "Service shutting down, closing channel")
TIMEOUT = _r(421, "4.4.2", "Timeout exceeded, closing channel")
DATA_TOO_SLOW = _r(421, "4.4.2", "Data rate too low, closing channel")
TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections, try again later")
INTERNAL_ERROR = _r(421, "4.3.0", "Internal error, closing channel")
TLS_NOT_AVAILABLE = _r(454, "4.7.0", "TLS not available")  # RFC 3207 §4


def message_accepted(queue_id: str) -> Reply:
    """The 250 for an accepted message, naming the id the store gave it."""
    return _vouched(250, "2.0.0", f"OK: queued as {queue_id}")


def mime_limit_exceeded(what: str) -> Reply:
    """554 5.6.0 for a message whose MIME structure passes a limit (RFC 3463 §3.7)."""
    return _r(554, "5.6.0", f"Message content rejected: {what}")


def sender_not_authenticated(reason: str) -> Reply:
    """550 5.7.1 for mail its sender's domain asks receivers to refuse (RFC 7489 §7.3;
    RFC 3463 X.7.1: delivery not authorized). The reason names the domain and the
    failure; it is cut to printable ASCII so no DNS-derived text can break the reply."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)[:400]
    return _r(550, "5.7.1", text or "Message refused by the sender's domain policy")


# --- replies the core sends by itself -----------------------------------------------
OK = _r(250, "2.0.0", "OK")
SENDER_OK = _r(250, "2.1.0", "Sender OK")
RECIPIENT_OK = _r(250, "2.1.5", "Recipient OK")
CLOSING = _r(221, "2.0.0", "Bye")
HELP = _r(214, "2.0.0", "See RFC 5321")
CANNOT_VRFY = _r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_MAIL_INPUT = _r(354, None, "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = _r(220, "2.0.0", "Ready to start TLS")  # RFC 3207 §4
LOGIN_USERNAME = _r(334, None, "VXNlcm5hbWU6")  # base64("Username:")
LOGIN_PASSWORD = _r(334, None, "UGFzc3dvcmQ6")  # base64("Password:")
EMPTY_CHALLENGE = _r(334, None, "")  # RFC 4954 §4: "334 " then the client's response

UNKNOWN_COMMAND = _r(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = _r(500, "5.5.2", "Line too long")  # RFC 5321 §4.5.3.1.4
AUTH_LINE_TOO_LONG = _r(500, "5.5.6", "Authentication exchange line is too long")  # RFC 4954
BARE_LF_IN_COMMAND = _r(500, "5.5.2", "Bare <LF> received, lines must end with <CR><LF>")
BARE_LF_IN_DATA = _r(550, "5.5.2", "Bare <LF> received in message, lines must end with <CR><LF>")
INVALID_UTF8 = _r(501, "5.5.4", "Arguments are not valid UTF-8")
NOT_IMPLEMENTED = _r(502, "5.5.1", "Command not implemented")
SYNTAX_EHLO = _r(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_HELO = _r(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_MAIL = _r(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = _r(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_NO_PARAMETERS = _r(501, "5.5.4", "Syntax error, no parameters allowed")
SYNTAX_VRFY = _r(501, "5.5.4", "Syntax: VRFY address")
SYNTAX_BDAT = _r(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
SYNTAX_AUTH = _r(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
BAD_SENDER_SYNTAX = _r(501, "5.1.7", "Bad sender address syntax")  # RFC 3463 X.1.7
BAD_RECIPIENT_SYNTAX = _r(501, "5.1.3", "Bad recipient address syntax")  # RFC 3463 X.1.3
NULL_RECIPIENT = _r(501, "5.1.3", "Null recipient address not allowed")
UTF8_NEEDS_SMTPUTF8 = _r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.5
UNKNOWN_PARAMETER = _r(555, "5.5.4", "Parameter not recognized")  # RFC 5321 §4.1.1.11
BAD_PARAMETER = _r(501, "5.5.4", "Invalid parameter value")
DUPLICATE_PARAMETER = _r(501, "5.5.4", "Duplicate parameter")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing channel")
TOO_MANY_RECIPIENT_ERRORS = _r(421, "4.7.0", "Too many rejected recipients, closing channel")

SEND_HELLO_FIRST = _r(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = _r(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = _r(503, "5.5.1", "Sender already specified")
NO_VALID_RECIPIENTS = _r(503, "5.5.1", "No valid recipients")  # RFC 5321 §3.3
BAD_SEQUENCE = _r(503, "5.5.1", "Bad sequence of commands")
ALREADY_AUTHENTICATED = _r(503, "5.5.1", "Already authenticated")  # RFC 4954 §4
AUTH_IN_TRANSACTION = _r(503, "5.5.1", "AUTH not permitted during a mail transaction")
BINARYMIME_NEEDS_BDAT = _r(503, "5.5.1", "BODY=BINARYMIME requires BDAT")  # RFC 3030 §3
TLS_ALREADY_ACTIVE = _r(503, "5.5.1", "TLS already active")
ENCRYPTION_REQUIRED = _r(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
UNKNOWN_MECHANISM = _r(504, "5.5.4", "Unrecognized authentication type")  # RFC 4954 §4
AUTH_CANCELLED = _r(501, "5.0.0", "Authentication cancelled")  # RFC 4954 §4
AUTH_UNDECODABLE = _r(501, "5.5.2", "Cannot decode response")  # RFC 4954 §4
AUTH_MALFORMED = _r(501, "5.5.2", "Malformed authentication response")


@functools.lru_cache(maxsize=64)
def greeting(hostname: str) -> Reply:
    """The 220 sent on connect (RFC 5321 §4.2; no enhanced code, RFC 2034 §3)."""
    return _r(220, None, f"{hostname} ESMTP")


@functools.lru_cache(maxsize=64)
def helo_reply(hostname: str) -> Reply:
    return _r(250, None, hostname)


def bdat_received(octets: int) -> Reply:
    """The reply to a BDAT chunk that is not the last (RFC 3030 §2)."""
    return _r(250, "2.0.0", f"{octets} octets received")


@functools.lru_cache(maxsize=64)
def ehlo_reply(config: ProtocolConfig, *, tls_active: bool) -> Reply:
    """The EHLO capability list for this channel (RFC 5321 §4.1.1.1).

    Cached: the list depends only on the (hashable, frozen) config and the TLS state.
    """
    lines = [config.hostname]
    lines.append(f"SIZE {config.max_message_size}" if config.max_message_size else "SIZE")
    if config.pipelining:
        lines.append("PIPELINING")  # RFC 2920
    if config.eightbitmime:
        lines.append("8BITMIME")  # RFC 6152
    if config.smtputf8:
        lines.append("SMTPUTF8")  # RFC 6531
    lines.append("ENHANCEDSTATUSCODES")  # RFC 2034
    if config.chunking:
        lines.append("CHUNKING")  # RFC 3030
        if config.binarymime_offered:
            lines.append("BINARYMIME")
    if config.tls_available and not tls_active:
        lines.append("STARTTLS")  # RFC 3207
    if config.auth_offered(tls_active=tls_active):
        lines.append("AUTH PLAIN LOGIN")  # RFC 4954
    return Reply(250, None, tuple(lines))
