"""Raw message bytes → the ``NewEmail`` record the store inserts (SPEC §5).

The original host parsed mail with MimeKit and stored what its properties returned, so
this module reproduces those properties: ``MessageId``/``InReplyTo``/``References``
forms, ``TextBody``/``HtmlBody`` selection, ``Attachments`` (Content-Disposition
``attachment`` only) and RFC 2047/2231 decoding.

Parsing uses the compat32 ``email`` parser rather than ``policy.default``: the modern
policy costs several times more CPU per message and this is the per-message hot path.
A message that is not multipart has only its header block run through the parser.

Content problems never raise: a malformed message is stored best effort. The errors
are :class:`AttachmentTooLarge` (552 5.3.4) and :class:`MimeLimitExceeded` (554 5.6.0):
the MIME limits of :class:`MimeLimits` are checked while the parser builds the tree, so
a hostile message is refused before it costs more than its own size. Header values are
cut to a bound before they are parsed, and every header parser is linear.
``build_email`` is pure and synchronous so the runtime can run big messages in a
worker process with CPU and memory limits (see :mod:`relate_smtp.handlers.parsing`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import Policy, compat32

import attrs

from relate_smtp.handlers._mime import (
    clean,
    decode_bytes,
    decode_header_text,
    fit,
    fit_references,
    mailboxes,
    message_id,
    message_ids,
)
from relate_smtp.handlers.limits import MimeLimits
from relate_smtp.handlers.mime_tree import (
    AttachmentTooLarge,
    Part,
    attachments,
    body_part,
    part_text,
)
from relate_smtp.storage.records import (
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    IN_REPLY_TO_MAX,
    MESSAGE_ID_MAX,
    RECIPIENT_BCC,
    RECIPIENT_CC,
    RECIPIENT_TO,
    REFERENCES_MAX,
    SUBJECT_MAX,
    HeaderRecipient,
    NewEmail,
)

log = logging.getLogger("relate_smtp.message")

# Put before the header block of a message whose body could not be parsed, so that the
# headers alone parse as a plain, empty entity (the first Content-Type wins in compat32).
_PLAIN_TEXT_HEAD = b"Content-Type: text/plain\r\n"

__all__ = [
    "PARSE_OFF_LOOP_ABOVE",
    "AttachmentTooLarge",
    "MimeLimitExceeded",
    "MimeLimits",
    "build_email",
    "looks_large",
]

# Measured: a typical message builds in well under a millisecond, cheaper than a hand-off
# to a worker; past 64 KiB (big HTML, attachments) parsing starts to stall the event loop.
PARSE_OFF_LOOP_ABOVE = 64 * 1024

NO_SUBJECT = "(No Subject)"

_RECIPIENT_TYPES = {"to": RECIPIENT_TO, "cc": RECIPIENT_CC, "bcc": RECIPIENT_BCC}
_SINGLE_HEADERS = frozenset({"message-id", "in-reply-to", "references", "from", "subject"})


class MimeLimitExceeded(Exception):
    """The message's structure passes a :class:`MimeLimits` bound (554 5.6.0)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def looks_large(size: int) -> bool:
    """Whether a message of ``size`` bytes should be parsed off the event loop."""
    return size > PARSE_OFF_LOOP_ABOVE


def build_email(
    raw: bytes,
    *,
    envelope_recipients: Sequence[str],
    sent_by_user_id: uuid.UUID | None,
    max_attachment_size: int,
    limits: MimeLimits = MimeLimits(),
    received_at: datetime | None = None,
) -> NewEmail:
    """Parse ``raw`` (the message as received, after dot-unstuffing) into a ``NewEmail``.

    Every string is cleaned and truncated to its column (SPEC §8), so the result always
    stores. Raises :class:`AttachmentTooLarge` when one decoded attachment is larger
    than ``max_attachment_size`` bytes and :class:`MimeLimitExceeded` when the structure
    passes ``limits``; nothing else about the content raises: a body the parser cannot
    take apart is stored as its raw text. ``MemoryError`` propagates: the caller's
    memory limit decides, not a fallback that would need the same memory again.
    """
    try:
        return _build_email(
            raw,
            envelope_recipients=envelope_recipients,
            sent_by_user_id=sent_by_user_id,
            max_attachment_size=max_attachment_size,
            limits=limits,
            received_at=received_at,
        )
    except (AttachmentTooLarge, MimeLimitExceeded, MemoryError):
        raise
    except Exception as exc:  # content must never turn into a temporary failure (SPEC §5)
        log.warning("message body could not be parsed (%s); stored as raw text", _kind(exc))
    head_end = _header_end(raw)
    head, body = (raw[: head_end[1]], raw[head_end[1] :]) if head_end else (raw, b"")
    headers_only = _build_email(
        _PLAIN_TEXT_HEAD + head,
        envelope_recipients=envelope_recipients,
        sent_by_user_id=sent_by_user_id,
        max_attachment_size=max_attachment_size,
        limits=limits,
        received_at=received_at,
    )
    return attrs.evolve(
        headers_only,
        text_body=clean(decode_bytes(body, None)),
        html_body=None,
        size_bytes=_stored_size(raw),
    )


def _stored_size(raw: bytes) -> int:
    """``Emails.SizeBytes``: the message without the CRLF that ends its last line, as the
    original measured its DATA block (everything before ``CRLF.CRLF``)."""
    return len(raw) - 2 if raw[-2:] == b"\r\n" else len(raw)


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def _build_email(
    raw: bytes,
    *,
    envelope_recipients: Sequence[str],
    sent_by_user_id: uuid.UUID | None,
    max_attachment_size: int,
    limits: MimeLimits,
    received_at: datetime | None,
) -> NewEmail:
    msg = _parse(raw, limits)
    tree = Part(msg)
    single: dict[str, str] = {}
    recipient_values: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    for name, value in msg.raw_items():
        key = name.lower()
        if key in _SINGLE_HEADERS:
            single.setdefault(key, str(value))
        elif key in recipient_values:
            recipient_values[key].append(str(value))

    from_address, from_name = "", ""
    if "from" in single:
        senders = mailboxes([single["from"]])
        if senders:
            from_name, from_address = senders[0]

    # MimeKit's ``Subject ?? "(No Subject)"``: only a missing header gets the stand-in;
    # an empty one is stored empty.
    subject = decode_header_text(single["subject"]) if "subject" in single else NO_SUBJECT

    msg_id = fit(message_id(single.get("message-id", "")), MESSAGE_ID_MAX)
    if not msg_id:
        msg_id = str(uuid.uuid4())
    reply_ids = message_ids(single["in-reply-to"]) if "in-reply-to" in single else []
    ref_ids = message_ids(single["references"]) if "references" in single else []
    header_recipients = _header_recipients(recipient_values, limits.max_header_recipients)

    text_part = body_part(tree, html=False)
    html_part = body_part(tree, html=True)

    return NewEmail(
        id=uuid.uuid4(),
        message_id=msg_id,
        from_address=fit(from_address, EMAIL_ADDRESS_MAX),
        from_display_name=fit(from_name, DISPLAY_NAME_MAX),
        subject=fit(subject, SUBJECT_MAX),
        text_body=clean(part_text(text_part)) if text_part is not None else None,
        html_body=clean(part_text(html_part)) if html_part is not None else None,
        received_at=received_at if received_at is not None else datetime.now(UTC),
        size_bytes=_stored_size(raw),
        in_reply_to=fit(reply_ids[0], IN_REPLY_TO_MAX) if reply_ids else None,
        references=fit_references(ref_ids, REFERENCES_MAX),
        sent_by_user_id=sent_by_user_id,
        header_recipients=header_recipients,
        envelope_recipients=tuple(envelope_recipients),
        attachments=tuple(attachments(tree, max_attachment_size)),
    )


def _header_recipients(values: dict[str, list[str]], limit: int) -> tuple[HeaderRecipient, ...]:
    """To, Cc and Bcc mailboxes as rows, the first ``limit`` of them (one log line if cut).

    Envelope recipients are linked by the store whatever this keeps, so a cut list
    never loses a local user's copy; it only bounds the rows one message can add.
    """
    rows: list[HeaderRecipient] = []
    for key, recipient_type in _RECIPIENT_TYPES.items():
        if not values[key]:
            continue
        room = limit - len(rows)
        found = mailboxes(values[key], limit=room + 1)
        if len(found) > room:
            log.info("header recipients beyond the first %d were not stored", limit)
            found = found[:room]
        rows.extend(
            HeaderRecipient(
                address=fit(address, EMAIL_ADDRESS_MAX),
                display_name=fit(name, DISPLAY_NAME_MAX),  # MimeKit's Name: "" when none
                type=recipient_type,
            )
            for name, address in found
        )
        if len(rows) >= limit:
            break
    return tuple(rows)


# --- parsing ---------------------------------------------------------------------------

# Parameters read from one Content-Type or Content-Disposition value. The stdlib's
# parameter splitter rescans the value from its start for every ";" inside quotes
# (quadratic), so a value is cut after this many ";" and to this many characters.
_MAX_PARAMETERS = 64
_MAX_PARAMETER_TEXT = 8 * 1024
_PARAMETER_HEADERS = frozenset({"content-type", "content-disposition"})


class _Guard:
    """Counts the entities of one parse and checks them against the limits."""

    __slots__ = ("limits", "parts")

    def __init__(self, limits: MimeLimits) -> None:
        self.limits = limits
        self.parts = 1

    def add_part(self, depth: int) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise MimeLimitExceeded(f"more than {self.limits.max_parts} MIME parts")
        if depth > self.limits.max_nesting_depth:
            raise MimeLimitExceeded(
                f"MIME nesting deeper than {self.limits.max_nesting_depth} levels"
            )

    def check_header(self, name: str, value: str) -> None:
        if len(name) + len(value) > self.limits.max_header_bytes:
            raise MimeLimitExceeded(
                f"a header field is longer than {self.limits.max_header_bytes} bytes"
            )


class _CheckedMessage(Message):
    """A compat32 message that enforces :class:`MimeLimits` as the parser fills it in.

    The feed parser builds every entity through its message factory and links it with
    ``attach``, and stores every header with ``set_raw``: checking there refuses a
    hostile message after at most one entity or header too many, not after the whole
    tree is in memory.
    """

    def __init__(self, policy: Policy = compat32, *, guard: _Guard | None = None) -> None:
        super().__init__(policy)
        self._guard = guard
        self._depth = 0

    def attach(self, payload: Message) -> None:  # type: ignore[override]
        if self._guard is not None and isinstance(payload, _CheckedMessage):
            payload._depth = self._depth + 1
            self._guard.add_part(payload._depth)
        super().attach(payload)

    def set_raw(self, name: str, value: str) -> None:
        if self._guard is not None:
            self._guard.check_header(name, value)
            if name.lower() in _PARAMETER_HEADERS:
                value = _tame_parameters(value)
        super().set_raw(name, value)


def _tame_parameters(value: str) -> str:
    """A Content-Type/-Disposition value cut to what the stdlib splits in linear time."""
    if len(value) > _MAX_PARAMETER_TEXT:
        value = value[:_MAX_PARAMETER_TEXT]
    if value.count(";") > _MAX_PARAMETERS:
        cut = -1
        for _ in range(_MAX_PARAMETERS + 1):
            cut = value.index(";", cut + 1)
        value = value[:cut]
    return value


def _parser(limits: MimeLimits) -> BytesParser:
    """A parser whose entities check ``limits``; one per message (it counts parts)."""
    guard = _Guard(limits)

    def factory(policy: Policy = compat32) -> Message:
        return _CheckedMessage(policy, guard=guard)

    return BytesParser(factory, policy=compat32)


def _parse(raw: bytes, limits: MimeLimits) -> Message:
    """Parse ``raw``, running only the header block through the parser when we can.

    For a message that is not multipart (or message/*), the body is one payload, so
    handing the header block to the parser and attaching the body ourselves gives the
    same tree as a full parse without the parser's per-line work on the body.
    """
    parser = _parser(limits)
    split = _header_end(raw)
    if split is not None:
        head_end, body_start = split
        head = parser.parsebytes(raw[:head_end], headersonly=True)
        if not head.get_payload() and head.get_content_maintype() not in ("multipart", "message"):
            head.set_payload(raw[body_start:].decode("ascii", "surrogateescape"))
            return head
    try:
        return _parser(limits).parsebytes(raw)
    except RecursionError:
        # Nesting deeper than the interpreter allows: keep the headers, body as raw text.
        head = _parser(limits).parsebytes(raw[: split[0]] if split else raw, headersonly=True)
        head.set_payload(raw[split[1] :].decode("ascii", "surrogateescape") if split else "")
        return head


def _header_end(raw: bytes) -> tuple[int, int] | None:
    """(end of the header block incl. its last line break, start of the body), if found."""
    if raw.startswith(b"\r\n"):
        return 0, 2
    if raw.startswith(b"\n"):
        return 0, 1
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or 0 <= crlf < lf:
        return crlf + 1, crlf + 3
    return lf + 1, lf + 2
