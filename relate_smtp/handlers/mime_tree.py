"""The MIME tree of a parsed message, after MimeKit's entity classes: which part is the
text body, which the HTML body, and which are attachments (SPEC §5)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32

from relate_smtp.handlers._mime import (
    clean,
    decode_bytes,
    decode_rfc2047,
    fit,
    fix_8bit,
    message_ids,
    unflow,
)
from relate_smtp.storage.records import CONTENT_TYPE_MAX, FILE_NAME_MAX, Attachment

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


class Part:
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
        self.children: tuple[Part, ...] = ()
        # The parser bounds nesting; the depth cap keeps this recursion bounded too.
        if msg.is_multipart() and self.maintype == "multipart" and depth < 200:
            payload = msg.get_payload()
            self.children = tuple(
                Part(child, depth + 1) for child in payload if isinstance(child, Message)
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


def body_part(msg: Part, *, html: bool) -> Part | None:
    """MimeKit's ``MimeMessage.GetTextBody``: which part is the text (or HTML) body."""
    if msg.is_multipart:
        return _multipart_body(msg, html=html)
    if msg.is_text and msg.is_format(html=html) and not msg.is_attachment:
        return msg
    return None


def _multipart_body(multipart: Part, *, html: bool) -> Part | None:
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


def _related_root(related: Part) -> Part | None:
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


def _leaves(msg: Part) -> Iterator[Part]:
    """MimeKit's ``BodyParts``: every non-multipart entity, not entering attached messages."""
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart:
            stack.extend(reversed(part.children))
        else:
            yield part


# --- content -----------------------------------------------------------------------------


def _param(part: Part, name: str, header: str = "content-type") -> str | None:
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


def part_text(entity: Part) -> str:
    """MimeKit's ``MultipartAlternative.GetText``: decoded text, format=flowed unwrapped."""
    part = entity.msg
    text = decode_bytes(_payload_bytes(part), _param(entity, "charset"))
    if entity.content_type == "text/plain":
        text_format = _param(entity, "format")
        if text_format is not None and text_format.strip().lower() == "flowed":
            delsp = _param(entity, "delsp")
            text = unflow(text, delete_space=delsp is not None and delsp.strip().lower() == "yes")
    return text


def _file_name(part: Part, content_type: str) -> str:
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


def attachments(msg: Part, max_size: int) -> Iterator[Attachment]:
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
