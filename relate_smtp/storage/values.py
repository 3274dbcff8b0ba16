"""How a message's values are made fit for the columns, the same way in every store.

SPEC §5: respect the column lengths by truncating, never failing; store text clean (no
NUL, no lone surrogates). The message handler already does both; the stores apply it
again so that a stray value never becomes a 451 retried forever, and so that SQLite and
PostgreSQL store the same row for the same record. A missing required value stays
``None``, so the database refuses the message rather than storing a made-up one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final, cast

import attrs

from relate_smtp.storage.records import (
    CONTENT_TYPE_MAX,
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    FILE_NAME_MAX,
    IN_REPLY_TO_MAX,
    MESSAGE_ID_MAX,
    RECIPIENT_TYPE_MAX,
    REFERENCES_MAX,
    SUBJECT_MAX,
    Attachment,
    HeaderRecipient,
    NewEmail,
)

__all__ = ["bare_message_id", "clean_text", "clip", "normalise_email", "utc"]

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def clip(value: str | None, limit: int) -> str | None:
    """``value`` cut to ``limit`` characters; ``None`` stays ``None``."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit]


def clean_text(value: str | None) -> str | None:
    """Without NUL (PostgreSQL refuses it in text) and with lone surrogates (which no
    driver can encode) as U+FFFD. The common ASCII case costs two C-level scans."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def bare_message_id(value: str | None) -> str | None:
    """A Message-ID as MimeKit stored it: no angle brackets, no blanks; ``<>`` or blank
    is no id at all. Each bracket goes on its own, so a half-bracketed ``<abc`` (or
    ``abc>``) names the same message as ``<abc>``."""
    if value is None:
        return None
    bare = value.strip().removeprefix("<").removesuffix(">").strip()
    return bare or None


def utc(value: datetime) -> datetime:
    """An instant in UTC; a naive datetime is taken as UTC, never local time."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _recipient(recipient: HeaderRecipient) -> HeaderRecipient:
    return HeaderRecipient(
        address=_clip_str(recipient.address, EMAIL_ADDRESS_MAX),
        display_name=clip(clean_text(recipient.display_name), DISPLAY_NAME_MAX),
        type=_clip_str(recipient.type, RECIPIENT_TYPE_MAX),
    )


def _attachment(attachment: Attachment) -> Attachment:
    return attrs.evolve(
        attachment,
        file_name=_clip_str(clean_text(attachment.file_name), FILE_NAME_MAX),
        content_type=_clip_str(attachment.content_type, CONTENT_TYPE_MAX),
    )


def _clip_str(value: str | None, limit: int) -> str:
    """For a field the record types ``str``: a None smuggled in stays None, for the
    database to refuse."""
    return cast(str, clip(value, limit))


def normalise_email(email: NewEmail) -> NewEmail:
    """``email`` as both stores write it: every value clipped to its column and cleaned."""
    return attrs.evolve(
        email,
        message_id=_clip_str(email.message_id, MESSAGE_ID_MAX),
        from_address=_clip_str(email.from_address, EMAIL_ADDRESS_MAX),
        from_display_name=_clip_str(clean_text(email.from_display_name), DISPLAY_NAME_MAX),
        subject=_clip_str(clean_text(email.subject), SUBJECT_MAX),
        text_body=clean_text(email.text_body),
        html_body=clean_text(email.html_body),
        received_at=utc(email.received_at),
        in_reply_to=clip(email.in_reply_to, IN_REPLY_TO_MAX),
        references=clip(email.references, REFERENCES_MAX),
        header_recipients=tuple(_recipient(r) for r in email.header_recipients),
        envelope_recipients=tuple(
            _clip_str(address, EMAIL_ADDRESS_MAX) for address in email.envelope_recipients
        ),
        attachments=tuple(_attachment(a) for a in email.attachments),
    )
