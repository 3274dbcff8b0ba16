"""The PostgreSQL store's SQL (everything but the batch insert) and its row mapping.

Queries and EF's indexes: the platform's ``IX_Users_Email`` is a plain index on
``"Email"``, not on ``lower("Email")``, and ``IX_UserEmailAddresses_Address`` is a plain
index on ``"Address"``. Matching must be case-insensitive (SPEC §3, §4), so a single-address
lookup first tries the exact spelling (served by ``IX_Users_Email``, the common case for
addresses typed the way they were registered) and only falls back to ``lower()`` scans
when that finds nothing; PostgreSQL's Append node stops at the first branch that
yields a row under ``LIMIT 1``. The batch statement compares ``lower()`` directly,
once per batch. Neither query needs an index the platform does not create; an operator
with a large ``"Users"`` table can add ``CREATE INDEX ON "Users" (lower("Email"))`` and
both queries use it unchanged.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from relate_smtp.storage.records import ApiKey, Attachment, RecipientRow, StoredEmail

SERVER_CONNECTIONS: Final = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())::int,
       (SELECT setting::int FROM pg_settings WHERE name = 'max_connections')
"""

USER_COLUMNS = 'u."Id", u."Email", u."DisplayName"'

# Exact spelling first (uses IX_Users_Email), then case-insensitive, then additional
# addresses verified or not (SPEC §4: the platform adds them unverified and cannot verify
# them; the original's GetByEmailAsync ignores IsVerified). An address several users list
# belongs to the lowest user id, as in batch.SAVE_BATCH's `owner`.
FIND_USER = f"""
(SELECT {USER_COLUMNS} FROM "Users" u WHERE u."Email" = $1 LIMIT 1)
UNION ALL
(SELECT {USER_COLUMNS} FROM "Users" u WHERE lower(u."Email") = lower($1) LIMIT 1)
UNION ALL
(SELECT {USER_COLUMNS} FROM "UserEmailAddresses" a JOIN "Users" u ON u."Id" = a."UserId"
 WHERE lower(a."Address") = lower($1) ORDER BY u."Id" LIMIT 1)
LIMIT 1
"""

# The user's primary address, then each additional address that belongs to them: not
# another user's primary (SPEC §4) nor listed by a user with a lower id (FIND_USER).
USER_ADDRESSES = """
SELECT 0 AS rank, lower("Email") AS address, NULL::timestamptz AS added, "Id" AS id
FROM "Users" WHERE "Id" = $1
UNION ALL
SELECT 1, lower(a."Address"), a."AddedAt", a."Id"
FROM "UserEmailAddresses" a WHERE a."UserId" = $1
AND NOT EXISTS (SELECT 1 FROM "Users" o
    WHERE o."Id" <> $1 AND lower(o."Email") = lower(a."Address"))
AND NOT EXISTS (SELECT 1 FROM "UserEmailAddresses" o
    WHERE o."UserId" < $1 AND lower(o."Address") = lower(a."Address"))
ORDER BY rank, added, id
"""

KEY_COLUMNS = (
    '"Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes", "CreatedAt", '
    '"LastUsedAt", "RevokedAt"'
)

CANDIDATE_KEYS = f"""
SELECT {KEY_COLUMNS} FROM "SmtpApiKeys"
WHERE "UserId" = $1 AND "RevokedAt" IS NULL AND ("KeyPrefix" = $2 OR "KeyPrefix" IS NULL)
ORDER BY ("KeyPrefix" IS NULL), "CreatedAt" DESC
"""

# Several hosts may touch one key: never move LastUsedAt backwards.
TOUCH_KEYS = """
UPDATE "SmtpApiKeys" AS k SET "LastUsedAt" = v.used
FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, used)
WHERE k."Id" = v.id AND (k."LastUsedAt" IS NULL OR k."LastUsedAt" < v.used)
"""

# The lower-cased addresses among $1 that are some user's primary or additional address.
OWNED_ADDRESSES: Final = """
SELECT lower(u."Email") AS address FROM "Users" u WHERE lower(u."Email") = ANY($1::text[])
UNION
SELECT lower(a."Address") FROM "UserEmailAddresses" a WHERE lower(a."Address") = ANY($1::text[])
"""

INSERT_USER: Final = """
INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "DisplayName", "CreatedAt")
VALUES ($1, $2, $3, $4, $5, $6)
"""

INSERT_ALIASES: Final = """
INSERT INTO "UserEmailAddresses" ("Id", "UserId", "Address", "IsVerified", "AddedAt")
SELECT a.id, $1, a.address, true, $2 FROM unnest($3::uuid[], $4::text[]) AS a(id, address)
"""

INSERT_KEY: Final = """
INSERT INTO "SmtpApiKeys" ("Id", "UserId", "Name", "KeyHash", "KeyPrefix", "Scopes",
    "CreatedAt")
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

KEYS_OF_USER: Final = f"""
SELECT {KEY_COLUMNS} FROM "SmtpApiKeys" WHERE "UserId" = $1 ORDER BY "CreatedAt", "Id"
"""

REVOKE_KEY: Final = """
UPDATE "SmtpApiKeys" SET "RevokedAt" = $2 WHERE "Id" = $1 AND "RevokedAt" IS NULL
"""

EMAIL_COLUMNS = (
    '"Id", "MessageId", "FromAddress", "FromDisplayName", "Subject", "TextBody", '
    '"HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References", "ThreadId", '
    '"SentByUserId"'
)

RECIPIENTS_OF = """
SELECT "EmailId", "Address", "DisplayName", "Type", "UserId" FROM "EmailRecipients"
WHERE "EmailId" = ANY($1::uuid[]) ORDER BY "EmailId", "Id"
"""

LATEST_EMAILS: Final = f"""
SELECT {EMAIL_COLUMNS} FROM "Emails" ORDER BY "ReceivedAt" DESC, "Id" DESC LIMIT $1
"""

EMAIL: Final = f'SELECT {EMAIL_COLUMNS} FROM "Emails" WHERE "Id" = $1'

ATTACHMENTS_OF: Final = """
SELECT "FileName", "ContentType", "Content" FROM "EmailAttachments"
WHERE "EmailId" = $1 ORDER BY "Id"
"""


def api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["Id"],
        user_id=row["UserId"],
        name=row["Name"],
        key_hash=row["KeyHash"],
        key_prefix=row["KeyPrefix"],
        scopes=row["Scopes"],
        created_at=row["CreatedAt"],
        last_used_at=row["LastUsedAt"],
        revoked_at=row["RevokedAt"],
    )


def recipient(row: asyncpg.Record) -> RecipientRow:
    return RecipientRow(
        address=row["Address"],
        display_name=row["DisplayName"],
        type=row["Type"],
        user_id=row["UserId"],
    )


def stored_email(
    row: asyncpg.Record,
    recipients: tuple[RecipientRow, ...],
    attachments: tuple[Attachment, ...],
) -> StoredEmail:
    return StoredEmail(
        id=row["Id"],
        message_id=row["MessageId"],
        from_address=row["FromAddress"],
        from_display_name=row["FromDisplayName"],
        subject=row["Subject"],
        text_body=row["TextBody"],
        html_body=row["HtmlBody"],
        received_at=row["ReceivedAt"],
        size_bytes=row["SizeBytes"],
        in_reply_to=row["InReplyTo"],
        references=row["References"],
        thread_id=row["ThreadId"],
        sent_by_user_id=row["SentByUserId"],
        recipients=recipients,
        attachments=attachments,
    )


def attachment(row: asyncpg.Record) -> Attachment:
    return Attachment(
        file_name=row["FileName"], content_type=row["ContentType"], content=bytes(row["Content"])
    )
