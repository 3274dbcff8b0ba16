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

import io
import logging
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Policy, compat32

import attrs

from relate_smtp.handlers._mime import (
    clean,
    decode_bytes,
    decode_header_text,
    decode_rfc2047,
    fit,
    fit_references,
    fix_8bit,
    mailboxes,
    message_id,
    message_ids,
    unflow,
)
from relate_smtp.handlers.limits import MimeLimits
from relate_smtp.storage.records import (
    CONTENT_TYPE_MAX,
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    FILE_NAME_MAX,
    IN_REPLY_TO_MAX,
    MESSAGE_ID_MAX,
    RECIPIENT_BCC,
    RECIPIENT_CC,
    RECIPIENT_TO,
    REFERENCES_MAX,
    SUBJECT_MAX,
    Attachment,
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
DEFAULT_ATTACHMENT_NAME = "attachment"

# SPEC §5: extension for an attachment that names no file.
_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/x-zip-compressed": ".zip",
    "application/msword": ".doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.ms-powerpoint": ".ppt",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ".pptx",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/csv": ".csv",
    "application/json": ".json",
    "application/xml": ".xml",
    "text/xml": ".xml",
}

_RECIPIENT_TYPES = {"to": RECIPIENT_TO, "cc": RECIPIENT_CC, "bcc": RECIPIENT_BCC}
_SINGLE_HEADERS = frozenset({"message-id", "in-reply-to", "references", "from", "subject"})


class MimeLimitExceeded(Exception):
    """The message's structure passes a :class:`MimeLimits` bound (554 5.6.0)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class AttachmentTooLarge(Exception):
    """A single decoded attachment exceeds MaxAttachmentSizeBytes (SPEC §5: 552 5.3.4)."""

    def __init__(self, *, file_name: str, size: int, limit: int) -> None:
        super().__init__(f"attachment {file_name!r} is {size} bytes, over the {limit}-byte limit")
        self.file_name = file_name
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:
        # Raised in a parsing worker process, so it must cross back by pickle.
        return (_attachment_too_large, (self.file_name, self.size, self.limit))


def _attachment_too_large(file_name: str, size: int, limit: int) -> AttachmentTooLarge:
    return AttachmentTooLarge(file_name=file_name, size=size, limit=limit)


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
    tree = _Part(msg)
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

    text_part = _body_part(tree, html=False)
    html_part = _body_part(tree, html=True)

    return NewEmail(
        id=uuid.uuid4(),
        message_id=msg_id,
        from_address=fit(from_address, EMAIL_ADDRESS_MAX),
        from_display_name=fit(from_name, DISPLAY_NAME_MAX),
        subject=fit(subject, SUBJECT_MAX),
        text_body=clean(_part_text(text_part)) if text_part is not None else None,
        html_body=clean(_part_text(html_part)) if html_part is not None else None,
        received_at=received_at if received_at is not None else datetime.now(UTC),
        size_bytes=_stored_size(raw),
        in_reply_to=fit(reply_ids[0], IN_REPLY_TO_MAX) if reply_ids else None,
        references=fit_references(ref_ids, REFERENCES_MAX),
        sent_by_user_id=sent_by_user_id,
        header_recipients=header_recipients,
        envelope_recipients=tuple(envelope_recipients),
        attachments=tuple(_attachments(tree, max_attachment_size)),
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


# --- MIME tree, after MimeKit's entity classes ---------------------------------------


class _Part:
    """One entity with its Content-Type and Content-Disposition looked up once.

    compat32's ``Message.get`` scans every header on each call; body selection asks
    about the same few parts many times, so the answers are kept here.
    """

    __slots__ = (
        "children",
        "content_type",
        "disposition",
        "maintype",
        "msg",
        "raw_headers",
        "subtype",
    )

    def __init__(self, msg: Message, depth: int = 0) -> None:
        self.msg = msg
        content_type = disposition = None
        for name, value in msg.raw_items():
            key = name.lower()
            if key == "content-type":
                if content_type is None:
                    content_type = str(value)
            elif key == "content-disposition" and disposition is None:
                disposition = str(value)
        # Same normalisation as compat32's get_content_type / get_content_disposition.
        ctype = content_type.partition(";")[0].strip().lower() if content_type else ""
        if ctype.count("/") != 1:
            ctype = msg.get_default_type()
        self.content_type = ctype
        self.raw_headers = {"content-type": content_type, "content-disposition": disposition}
        self.maintype, _, self.subtype = ctype.partition("/")
        self.disposition = disposition.partition(";")[0].strip().lower() if disposition else None
        self.children: tuple[_Part, ...] = ()
        # The parser bounds nesting; the depth cap keeps this recursion bounded too.
        if msg.is_multipart() and self.maintype == "multipart" and depth < 200:
            payload = msg.get_payload()
            self.children = tuple(
                _Part(child, depth + 1) for child in payload if isinstance(child, Message)
            )

    @property
    def is_multipart(self) -> bool:
        """MimeKit's ``Multipart``: a multipart/* the parser could split on its boundary."""
        return self.maintype == "multipart" and self.msg.is_multipart()

    @property
    def is_text(self) -> bool:
        """MimeKit's ``TextPart``: any text/* leaf.

        A multipart/* the parser could not split (no or unmatched boundary) is a part
        that cannot be parsed; SPEC §5 stores it best effort, so it counts as plain text.
        """
        return self.maintype in ("text", "multipart") and not self.msg.is_multipart()

    @property
    def is_attachment(self) -> bool:
        """MimeKit's ``IsAttachment``: Content-Disposition is ``attachment`` (not inline)."""
        return self.disposition == "attachment"

    def is_format(self, *, html: bool) -> bool:
        """MimeKit's ``TextPart.IsFormat``: text/html for HTML, text/plain for text."""
        if self.maintype == "multipart":
            return not html
        return self.subtype == ("html" if html else "plain")


def _body_part(msg: _Part, *, html: bool) -> _Part | None:
    """MimeKit's ``MimeMessage.GetTextBody``: which part is the text (or HTML) body."""
    if msg.is_multipart:
        return _multipart_body(msg, html=html)
    if msg.is_text and msg.is_format(html=html) and not msg.is_attachment:
        return msg
    return None


def _multipart_body(multipart: _Part, *, html: bool) -> _Part | None:
    """MimeKit's ``Multipart.TryGetValue`` and its alternative/related overrides."""
    children = multipart.children
    if multipart.subtype == "alternative":
        # The most faithful alternative comes last (RFC 2046 §5.1.4).
        for child in reversed(children):
            if child.is_multipart:
                found = _multipart_body(child, html=html)
                if found is not None:
                    return found
            elif child.is_text and child.is_format(html=html):
                return child
        return None
    if multipart.subtype == "related":
        root = _related_root(multipart)
        if root is None:
            return None
        if root.is_multipart:
            return _multipart_body(root, html=html)
        return root if root.is_text and root.is_format(html=html) else None
    # multipart/mixed and anything else: the first text part is the body; a text
    # body never follows a nested multipart.
    for child in children:
        if child.is_multipart:
            return _multipart_body(child, html=html)
        if child.is_text and not child.is_attachment:
            return child if child.is_format(html=html) else None
    return None


def _related_root(related: _Part) -> _Part | None:
    """MimeKit's ``MultipartRelated.Root`` (RFC 2387 §3.2 ``start``, then ``type``)."""
    children = related.children
    if not children:
        return None
    start = _param(related, "start")
    if start is not None:
        ids = message_ids(start)
        wanted = ids[0] if ids else start.strip()
        for child in children:
            cid = message_ids(str(child.msg.get("content-id", "")))
            if cid and cid[0] == wanted:
                return child
        return children[0]
    root_type = _param(related, "type")
    if root_type is not None:
        root_type = root_type.strip().lower()
        for child in children:
            if child.content_type == root_type:
                return child
    return children[0]


def _leaves(msg: _Part) -> Iterator[_Part]:
    """MimeKit's ``BodyParts``: every non-multipart entity, not entering attached messages."""
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart:
            stack.extend(reversed(part.children))
        else:
            yield part


# --- content -----------------------------------------------------------------------------


def _param(part: _Part, name: str, header: str = "content-type") -> str | None:
    """A Content-Type/-Disposition parameter, RFC 2231 and 8-bit decoded, or None."""
    msg = part.msg
    raw = part.raw_headers[header]
    if raw is not None and not raw.isascii():
        # compat32 hands 8-bit header values out as Header objects that lose the raw
        # bytes; a scratch message holding the decoded text keeps them (RFC 6532).
        msg = Message()
        msg[header] = fix_8bit(raw)
    value = msg.get_param(name, None, header)
    if value is None:
        return None
    if isinstance(value, tuple):
        charset, _language, text = value
        return decode_bytes(str(text).encode("raw-unicode-escape"), charset or None)
    return fix_8bit(str(value))


def _payload_bytes(part: Message) -> bytes:
    """The part's content, transfer-decoded (base64, quoted-printable, uuencode)."""
    if part.is_multipart():
        # An attached message (message/rfc822): its bytes as a MessagePart writes them.
        buffer = io.BytesIO()
        generator = BytesGenerator(buffer, mangle_from_=False, maxheaderlen=0, policy=compat32)
        for child in part.get_payload():
            if isinstance(child, Message):
                generator.flatten(child)
        return buffer.getvalue()
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _part_text(entity: _Part) -> str:
    """MimeKit's ``MultipartAlternative.GetText``: decoded text, format=flowed unwrapped."""
    part = entity.msg
    text = decode_bytes(_payload_bytes(part), _param(entity, "charset"))
    if entity.content_type == "text/plain":
        text_format = _param(entity, "format")
        if text_format is not None and text_format.strip().lower() == "flowed":
            delsp = _param(entity, "delsp")
            text = unflow(text, delete_space=delsp is not None and delsp.strip().lower() == "yes")
    return text


def _file_name(part: _Part, content_type: str) -> str:
    """MimeKit's ``FileName`` (disposition filename, else type name) or a generated one."""
    for name, header in (("filename", "content-disposition"), ("name", "content-type")):
        value = _param(part, name, header)
        if value is not None:
            value = decode_rfc2047(value).strip()
            if value:
                return value
    return DEFAULT_ATTACHMENT_NAME + _EXTENSIONS.get(content_type, "")


def _fit_file_name(name: str) -> str:
    """Truncate a file name to its column, keeping a short extension intact."""
    name = clean(name)
    if len(name) <= FILE_NAME_MAX:
        return name
    dot = name.rfind(".")
    extension = name[dot:] if dot > 0 and len(name) - dot <= 16 else ""
    return name[: FILE_NAME_MAX - len(extension)] + extension


def _attachments(msg: _Part, max_size: int) -> Iterator[Attachment]:
    for part in _leaves(msg):
        if not part.is_attachment:
            continue
        content_type = part.content_type
        file_name = _fit_file_name(_file_name(part, content_type))
        content = _payload_bytes(part.msg)
        if len(content) > max_size:
            raise AttachmentTooLarge(file_name=file_name, size=len(content), limit=max_size)
        yield Attachment(
            file_name=file_name,
            content_type=fit(content_type, CONTENT_TYPE_MAX),
            content=content,
        )
