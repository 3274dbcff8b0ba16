"""The SQLite store's SQL and how its rows map to records (everything but saving mail).

Values are stored as the platform's columns expect them: uuids as lower-case canonical
text, times as ISO-8601 UTC text with microseconds (so text order is time order),
booleans as 0/1, attachment content as BLOBs.
"""

from __future__ import annotations

import json
import sqlite3
import string
import uuid
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from relate_smtp.storage.accounts import CLI_OIDC_ISSUER, NewUser, refuse_taken
from relate_smtp.storage.errors import UserNotFound
from relate_smtp.storage.records import ApiKey, Attachment, RecipientRow, StoredEmail
from relate_smtp.storage.values import utc

# SQLite's lower() folds ASCII only; query values are folded the same way so that an
# index on lower(column) is used and both sides agree.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def column_value(value: object) -> object:
    """A value as the SQLite columns hold it: uuids and times as text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return ts(value)
    return value


def opt_uuid_text(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def opt_uuid(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(value)


def ts(value: datetime) -> str:
    """ISO-8601 UTC text; a naive datetime is taken to be UTC already."""
    return utc(value).isoformat(timespec="microseconds")


def dt(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def opt_dt(text: str | None) -> datetime | None:
    return None if text is None else dt(text)


# --- queries -------------------------------------------------------------------------

# Additional addresses count verified or not (SPEC §4: the platform adds them unverified
# and cannot verify them); a primary address beats them, then the lowest user id wins.
_USERS_BY_ADDRESSES = """
SELECT u."Email", u."Id", 0 AS "Rank" FROM "Users" u
 WHERE lower(u."Email") IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT a."Address", a."UserId", 1 AS "Rank" FROM "UserEmailAddresses" a
 WHERE lower(a."Address") IN (SELECT value FROM json_each(?1))
ORDER BY "Rank", 2
"""

FIND_USER = """
SELECT "Id", "Email", "DisplayName" FROM (
  SELECT u."Id", u."Email", u."DisplayName", 0 AS "Rank" FROM "Users" u
   WHERE lower(u."Email") = ?1
  UNION ALL
  SELECT u."Id", u."Email", u."DisplayName", 1 AS "Rank"
    FROM "UserEmailAddresses" a JOIN "Users" u ON u."Id" = a."UserId"
   WHERE lower(a."Address") = ?1
) ORDER BY "Rank", "Id" LIMIT 1
"""

# The user's primary address, then each additional address that belongs to them: not
# another user's primary (SPEC §4) nor listed by a user with a lower id (FIND_USER).
USER_ADDRESSES = """
SELECT "Email", 0 FROM "Users" WHERE "Id" = ?1
UNION ALL
SELECT a."Address", 1 FROM "UserEmailAddresses" a WHERE a."UserId" = ?1
 AND NOT EXISTS (SELECT 1 FROM "Users" o
  WHERE o."Id" <> ?1 AND lower(o."Email") = lower(a."Address"))
 AND NOT EXISTS (SELECT 1 FROM "UserEmailAddresses" o
  WHERE o."UserId" < ?1 AND lower(o."Address") = lower(a."Address"))
ORDER BY 2, 1
"""

PARENT = """
SELECT "Id", "ThreadId" FROM "Emails" WHERE "MessageId" IN (?, ?)
 ORDER BY "ReceivedAt", "Id" LIMIT 1
"""

INSERT_EMAIL = """
INSERT INTO "Emails" ("Id", "MessageId", "FromAddress", "FromDisplayName", "Subject",
  "TextBody", "HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References",
  "SentByUserId", "ThreadId")
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

INSERT_RECIPIENT = """
INSERT INTO "EmailRecipients" ("Id", "EmailId", "Address", "DisplayName", "Type", "UserId",
  "IsRead")
VALUES (?, ?, ?, ?, ?, ?, 0)
"""

INSERT_ATTACHMENT = """
INSERT INTO "EmailAttachments" ("Id", "EmailId", "FileName", "ContentType", "SizeBytes",
  "Content")
VALUES (?, ?, ?, ?, ?, ?)
"""

EMAIL_COLUMNS = """
"Id", "MessageId", "FromAddress", "FromDisplayName", "Subject", "TextBody", "HtmlBody",
"ReceivedAt", "SizeBytes", "InReplyTo", "References", "ThreadId", "SentByUserId"
"""

API_KEY_COLUMNS = """
"Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes", "CreatedAt", "LastUsedAt",
"RevokedAt"
"""

CANDIDATE_KEYS = f"""
SELECT {API_KEY_COLUMNS} FROM "SmtpApiKeys"
 WHERE "UserId" = ? AND "RevokedAt" IS NULL AND ("KeyPrefix" = ? OR "KeyPrefix" IS NULL)
 ORDER BY "KeyPrefix" IS NULL, "CreatedAt", "Id"
"""

KEYS_OF_USER = f"""
SELECT {API_KEY_COLUMNS} FROM "SmtpApiKeys" WHERE "UserId" = ? ORDER BY "CreatedAt", "Id"
"""

TOUCH_KEY = 'UPDATE "SmtpApiKeys" SET "LastUsedAt" = ? WHERE "Id" = ?'

REVOKE_KEY = 'UPDATE "SmtpApiKeys" SET "RevokedAt" = ? WHERE "Id" = ? AND "RevokedAt" IS NULL'


def users_by_address(conn: sqlite3.Connection, addresses: Iterable[str]) -> dict[str, uuid.UUID]:
    """Lower-cased address → user, primary addresses taking precedence over aliases."""
    keys = sorted({ascii_lower(address) for address in addresses})
    users: dict[str, uuid.UUID] = {}
    if not keys:
        return users
    for address, user_id, _rank in conn.execute(_USERS_BY_ADDRESSES, (json.dumps(keys),)):
        users.setdefault(address.lower(), uuid.UUID(user_id))
    return users


def _email_record(
    row: Sequence[Any],
    recipients: tuple[RecipientRow, ...] = (),
    attachments: tuple[Attachment, ...] = (),
) -> StoredEmail:
    return StoredEmail(
        id=uuid.UUID(row[0]),
        message_id=row[1],
        from_address=row[2],
        from_display_name=row[3],
        subject=row[4],
        text_body=row[5],
        html_body=row[6],
        received_at=dt(row[7]),
        size_bytes=row[8],
        in_reply_to=row[9],
        references=row[10],
        thread_id=opt_uuid(row[11]),
        sent_by_user_id=opt_uuid(row[12]),
        recipients=recipients,
        attachments=attachments,
    )


def _recipient_record(row: Sequence[Any]) -> RecipientRow:
    return RecipientRow(address=row[0], display_name=row[1], type=row[2], user_id=opt_uuid(row[3]))


def api_key_record(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=uuid.UUID(row[0]),
        user_id=uuid.UUID(row[1]),
        name=row[2],
        key_hash=row[3],
        key_prefix=row[4],
        scopes=row[5],
        created_at=dt(row[6]),
        last_used_at=opt_dt(row[7]),
        revoked_at=opt_dt(row[8]),
    )


def _recipients_of(
    conn: sqlite3.Connection, email_ids: Collection[str]
) -> dict[str, list[RecipientRow]]:
    by_email: dict[str, list[RecipientRow]] = {email_id: [] for email_id in email_ids}
    query = """
        SELECT "EmailId", "Address", "DisplayName", "Type", "UserId" FROM "EmailRecipients"
         WHERE "EmailId" IN (SELECT value FROM json_each(?)) ORDER BY rowid
    """
    for row in conn.execute(query, (json.dumps(list(email_ids)),)):
        by_email[row[0]].append(_recipient_record(row[1:]))
    return by_email


def get_email(conn: sqlite3.Connection, email_id: str) -> StoredEmail | None:
    row = conn.execute(
        f'SELECT {EMAIL_COLUMNS} FROM "Emails" WHERE "Id" = ?', (email_id,)
    ).fetchone()
    if row is None:
        return None
    attachments = tuple(
        Attachment(file_name=name, content_type=content_type, content=bytes(content))
        for name, content_type, content in conn.execute(
            'SELECT "FileName", "ContentType", "Content" FROM "EmailAttachments"'
            ' WHERE "EmailId" = ? ORDER BY rowid',
            (email_id,),
        )
    )
    recipients = tuple(_recipients_of(conn, [email_id])[email_id])
    return _email_record(row, recipients, attachments)


def list_emails(conn: sqlite3.Connection, limit: int) -> list[StoredEmail]:
    rows = conn.execute(
        f'SELECT {EMAIL_COLUMNS} FROM "Emails" ORDER BY "ReceivedAt" DESC, rowid DESC LIMIT ?',
        (limit,),
    ).fetchall()
    recipients = _recipients_of(conn, [row[0] for row in rows])
    return [_email_record(row, tuple(recipients[row[0]])) for row in rows]


def create_user(conn: sqlite3.Connection, new: NewUser) -> None:
    refuse_taken(new, users_by_address(conn, new.addresses))
    user = new.user
    created = ts(new.created_at)
    conn.execute(
        'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "DisplayName",'
        ' "CreatedAt") VALUES (?, ?, ?, ?, ?, ?)',
        (str(user.id), str(user.id), CLI_OIDC_ISSUER, user.email, user.display_name, created),
    )
    conn.executemany(
        'INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified", "AddedAt")'
        " VALUES (?, ?, ?, 1, ?)",
        [(str(alias_id), str(user.id), alias, created) for alias_id, alias in new.aliases],
    )


def create_api_key(conn: sqlite3.Connection, key: ApiKey) -> None:
    exists = conn.execute('SELECT 1 FROM "Users" WHERE "Id" = ?', (str(key.user_id),)).fetchone()
    if exists is None:
        raise UserNotFound(key.user_id)
    conn.execute(
        f'INSERT INTO "SmtpApiKeys" ({API_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)',
        (
            str(key.id),
            str(key.user_id),
            key.name,
            key.key_hash,
            key.key_prefix,
            key.scopes,
            ts(key.created_at),
        ),
    )
