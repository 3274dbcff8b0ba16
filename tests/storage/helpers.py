"""Builders shared by the storage tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import attrs

from relate_smtp.storage import Attachment, HeaderRecipient, NewEmail
from relate_smtp.storage.records import RECIPIENT_BCC, RECIPIENT_CC, RECIPIENT_TO

__all__ = ["attachment", "bcc", "cc", "new_email", "to"]


def new_email(**changes: Any) -> NewEmail:
    """A plain message with a fresh id and Message-ID; ``changes`` override fields."""
    email = NewEmail(
        id=uuid.uuid4(),
        message_id=f"{uuid.uuid4()}@sender.example",
        from_address="sender@sender.example",
        from_display_name="Sender",
        subject="Hello",
        text_body="Hello there.",
        html_body=None,
        received_at=datetime.now(UTC),
        size_bytes=321,
        in_reply_to=None,
        references=None,
        sent_by_user_id=None,
        header_recipients=(),
        envelope_recipients=(),
    )
    return attrs.evolve(email, **changes)


def to(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_TO)


def cc(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_CC)


def bcc(address: str, name: str | None = None) -> HeaderRecipient:
    return HeaderRecipient(address=address, display_name=name, type=RECIPIENT_BCC)


def attachment(name: str, content: bytes, content_type: str = "application/pdf") -> Attachment:
    return Attachment(file_name=name, content_type=content_type, content=content)
