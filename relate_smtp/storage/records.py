"""Records exchanged with the stores, column limits, and the envelope-truth linking rule.

Both backends (SQLite and PostgreSQL) share these so that a message is stored the
same way whichever database holds it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime

import attrs

# Column lengths of the platform's schema (SPEC §8). A message's values are truncated,
# never rejected (SPEC §5, storage.values); an administrative value too long is refused
# (storage.accounts).
EMAIL_ADDRESS_MAX = 320
MESSAGE_ID_MAX = 500
DISPLAY_NAME_MAX = 500
SUBJECT_MAX = 1000
IN_REPLY_TO_MAX = 500
REFERENCES_MAX = 2000
RECIPIENT_TYPE_MAX = 10
FILE_NAME_MAX = 500
CONTENT_TYPE_MAX = 200
KEY_NAME_MAX = 100
KEY_HASH_MAX = 128
KEY_PREFIX_MAX = 12
SCOPES_MAX = 500

RECIPIENT_TO = "To"
RECIPIENT_CC = "Cc"
RECIPIENT_BCC = "Bcc"


@attrs.frozen(kw_only=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str | None = None


@attrs.frozen(kw_only=True)
class ApiKey:
    """A row of ``SmtpApiKeys``; ``scopes`` is the raw JSON text of the column."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    key_hash: str
    key_prefix: str | None
    scopes: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@attrs.frozen(kw_only=True)
class HeaderRecipient:
    """A mailbox named in a To, Cc or Bcc header."""

    address: str
    display_name: str | None
    type: str  # RECIPIENT_TO | RECIPIENT_CC | RECIPIENT_BCC


@attrs.frozen(kw_only=True)
class Attachment:
    file_name: str
    content_type: str
    content: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.content)


@attrs.frozen(kw_only=True)
class NewEmail:
    """A parsed message ready to store (values already truncated to their columns).

    User links and the thread id are resolved by the store inside the same transaction
    that inserts the rows, from ``envelope_recipients`` and ``in_reply_to``.
    """

    id: uuid.UUID
    message_id: str
    from_address: str
    from_display_name: str
    subject: str
    text_body: str | None
    html_body: str | None
    received_at: datetime
    size_bytes: int
    in_reply_to: str | None
    references: str | None
    sent_by_user_id: uuid.UUID | None
    header_recipients: tuple[HeaderRecipient, ...]
    envelope_recipients: tuple[str, ...]
    attachments: tuple[Attachment, ...] = ()


def emails_row(email: NewEmail) -> tuple[object, ...]:
    """The message's ``Emails`` columns in the order both stores insert them: ``Id``,
    ``MessageId``, ``FromAddress``, ``FromDisplayName``, ``Subject``, ``TextBody``,
    ``HtmlBody``, ``ReceivedAt``, ``SizeBytes``, ``InReplyTo``, ``References``,
    ``SentByUserId`` (``ThreadId``, resolved by the store, comes after)."""
    return (
        email.id,
        email.message_id,
        email.from_address,
        email.from_display_name,
        email.subject,
        email.text_body,
        email.html_body,
        email.received_at,
        email.size_bytes,
        email.in_reply_to,
        email.references,
        email.sent_by_user_id,
    )


@attrs.frozen(kw_only=True)
class RecipientRow:
    """A row of ``EmailRecipients`` as it will be inserted."""

    address: str
    display_name: str | None
    type: str
    user_id: uuid.UUID | None


@attrs.frozen(kw_only=True)
class SavedEmail:
    id: uuid.UUID
    thread_id: uuid.UUID | None
    linked_user_ids: tuple[uuid.UUID, ...]


@attrs.frozen(kw_only=True)
class StoredEmail:
    """An e-mail read back from the store (for the CLI and tests)."""

    id: uuid.UUID
    message_id: str
    from_address: str
    from_display_name: str | None
    subject: str
    text_body: str | None
    html_body: str | None
    received_at: datetime
    size_bytes: int
    in_reply_to: str | None
    references: str | None
    thread_id: uuid.UUID | None
    sent_by_user_id: uuid.UUID | None
    recipients: tuple[RecipientRow, ...] = ()
    attachments: tuple[Attachment, ...] = ()


def link_recipients(
    header_recipients: Iterable[HeaderRecipient],
    envelope_recipients: Iterable[str],
    users_by_address: Mapping[str, uuid.UUID],
) -> tuple[RecipientRow, ...]:
    """Apply SPEC §5/§10's envelope truth to build the ``EmailRecipients`` rows.

    ``users_by_address`` maps lower-cased addresses (primary or additional) to user
    ids. A header row is linked only when its user is also an envelope recipient (a
    header alone never delivers to a local user); an envelope recipient whose user no
    header row links gets a ``Bcc`` row; each user is linked at most once.
    """
    envelope_users: dict[uuid.UUID, str] = {}
    for address in envelope_recipients:
        user_id = users_by_address.get(address.lower())
        if user_id is not None and user_id not in envelope_users:
            envelope_users[user_id] = address
    rows: list[RecipientRow] = []
    linked: set[uuid.UUID] = set()
    for recipient in header_recipients:
        user_id = users_by_address.get(recipient.address.lower())
        if user_id is not None and user_id in envelope_users and user_id not in linked:
            linked.add(user_id)
        else:
            user_id = None
        rows.append(
            RecipientRow(
                address=recipient.address,
                display_name=recipient.display_name,
                type=recipient.type,
                user_id=user_id,
            )
        )
    for user_id, address in envelope_users.items():
        if user_id not in linked:
            linked.add(user_id)
            rows.append(
                RecipientRow(
                    address=address[:EMAIL_ADDRESS_MAX],
                    display_name=None,
                    type=RECIPIENT_BCC,
                    user_id=user_id,
                )
            )
    return tuple(rows)
