"""A whole group-commit batch in ONE PostgreSQL statement.

Crossing into the asyncio thread that runs asyncpg (``bridge.py``) costs more than the
SQL of one message. So a batch crosses once and is stored by :data:`SAVE_BATCH`, CTEs over
``unnest`` arrays that resolve the recipients' users and the threads and insert every
row, which PostgreSQL commits atomically with one WAL flush.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import cast

import asyncpg
import attrs

from relate_smtp.storage.groupcommit import Outcome
from relate_smtp.storage.ids import new_id
from relate_smtp.storage.records import RECIPIENT_BCC, NewEmail, SavedEmail, emails_row
from relate_smtp.storage.values import bare_message_id

__all__ = [
    "SAVE_BATCH",
    "MessageRows",
    "find_saved",
    "message_rows",
    "statement",
    "statement_args",
    "store_batch",
]


# A whole group-commit batch in ONE statement, which PostgreSQL commits or rolls back as
# a whole: one round trip and one WAL flush however many messages and rows it carries.
# Under READ COMMITTED a separate lookup first would add a round trip and no guarantee.
#
# It resolves the batch's addresses to users (`owner`: primary rank 0 beats an
# additional address, verified or not, rank 1; ties go to the lowest user id) and each
# reply's thread (`thread`: the parent is the earliest message stored with that
# Message-ID, compared bare and bracketed because MimeKit stored it
# bare and other writers did not; looked up per parent through LATERAL so that no plan,
# not even one made while "Emails" was empty, reads the whole table for each batch),
# then applies `records.link_recipients` in SQL:
#   - `env`: each user the envelope names, once, with the first envelope address naming
#     them (envelope ids are time-ordered, so `ORDER BY v.id` is envelope order);
#   - a header row is linked only when it is the first header row naming its user
#     (`nth = 1`) and that user is in `env`;
#   - every `env` user no header row names gets a Bcc row, under the id pre-assigned
#     to that envelope position. All header ids precede all envelope ids of a message,
#     so `ORDER BY "Id"` reads header rows in order, then Bcc rows in envelope order.
# The statement sees the database as it was before the batch, as two concurrent
# transactions would: a reply whose parent is in the same batch is not threaded under
# it. Foreign keys are checked at the end of the statement, when the Emails rows
# inserted by `email` are visible. The result is one row per stored message: its thread and its
# linked users in row order.
def _save_batch_sql(*, threads: bool, attachments: bool) -> str:
    """The batch statement; without ``threads`` (no message of the batch replies to
    anything) it skips the parent lookup, without ``attachments`` the attachment insert
    and its six parameters: executor start-up is a fair share of a small batch's cost."""
    thread = """
), thread AS (
    SELECT p.parent, t.thread_id
    FROM (SELECT DISTINCT parent FROM msg WHERE parent IS NOT NULL) AS p
    CROSS JOIN LATERAL (
        SELECT COALESCE(e."ThreadId", e."Id") AS thread_id FROM "Emails" e
        WHERE e."MessageId" IN (p.parent, '<' || p.parent || '>')
        ORDER BY e."ReceivedAt", e."Id" LIMIT 1
    ) AS t"""
    attachment = """
), attachment AS (
    INSERT INTO "EmailAttachments" ("Id", "EmailId", "FileName", "ContentType", "SizeBytes",
        "Content")
    SELECT * FROM unnest($25::uuid[], $26::uuid[], $27::text[], $28::text[], $29::bigint[],
        $30::bytea[])"""
    optional_thread = thread if threads else ""
    return f"""
WITH msg AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::timestamptz[], $9::bigint[], $10::text[], $11::text[],
        $12::uuid[], $13::text[])
    AS m(id, message_id, from_address, from_display_name, subject, text_body, html_body,
        received_at, size_bytes, in_reply_to, refs, sent_by, parent)
), hdr_in AS (
    SELECT * FROM unnest($14::uuid[], $15::uuid[], $16::text[], $17::text[], $18::text[],
        $19::text[])
    AS h(email_id, id, key, address, display_name, type)
), env_in AS (
    SELECT * FROM unnest($20::uuid[], $21::uuid[], $22::text[], $23::text[])
    AS v(email_id, id, key, address)
), found AS (
    SELECT 0 AS rank, lower(u."Email") AS key, u."Id" AS user_id
    FROM "Users" u WHERE lower(u."Email") = ANY($24::text[])
    UNION ALL
    SELECT 1, lower(a."Address"), a."UserId"
    FROM "UserEmailAddresses" a WHERE lower(a."Address") = ANY($24::text[])
), owner AS (
    SELECT DISTINCT ON (key) key, user_id FROM found ORDER BY key, rank, user_id{optional_thread}
), env AS (
    SELECT DISTINCT ON (v.email_id, o.user_id) v.email_id, v.id, v.address, o.user_id
    FROM env_in v JOIN owner o ON o.key = v.key
    ORDER BY v.email_id, o.user_id, v.id
), hdr AS (
    SELECT h.*, o.user_id AS candidate,
        row_number() OVER (PARTITION BY h.email_id, o.user_id ORDER BY h.id) AS nth
    FROM hdr_in h LEFT JOIN owner o ON o.key = h.key
), email AS (
    INSERT INTO "Emails" ("Id", "MessageId", "FromAddress", "FromDisplayName", "Subject",
        "TextBody", "HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References",
        "ThreadId", "SentByUserId")
    SELECT m.id, m.message_id, m.from_address, m.from_display_name, m.subject, m.text_body,
        m.html_body, m.received_at, m.size_bytes, m.in_reply_to, m.refs,
        {"t.thread_id" if threads else "NULL::uuid"}, m.sent_by
    FROM msg m{" LEFT JOIN thread t ON t.parent = m.parent" if threads else ""}
    RETURNING "Id", "ThreadId"
), recipient AS (
    INSERT INTO "EmailRecipients" ("Id", "EmailId", "Address", "DisplayName", "Type",
        "UserId", "IsRead")
    SELECT h.id, h.email_id, h.address, h.display_name, h.type,
        CASE WHEN h.nth = 1 AND EXISTS (
            SELECT 1 FROM env WHERE env.email_id = h.email_id AND env.user_id = h.candidate
        ) THEN h.candidate END,
        false
    FROM hdr h
    UNION ALL
    SELECT v.id, v.email_id, v.address, NULL, '{RECIPIENT_BCC}', v.user_id, false
    FROM env v
    WHERE NOT EXISTS (
        SELECT 1 FROM hdr h WHERE h.email_id = v.email_id AND h.candidate = v.user_id
    )
    RETURNING "Id", "EmailId", "UserId"{attachment if attachments else ""}
)
SELECT e."Id" AS id, e."ThreadId" AS thread_id,
    ARRAY(SELECT r."UserId" FROM recipient r WHERE r."EmailId" = e."Id"
        AND r."UserId" IS NOT NULL ORDER BY r."Id") AS linked
FROM email e
"""


#: Every variant, by (threads, attachments); :data:`SAVE_BATCH` is the whole statement.
_STATEMENTS = {
    (threads, attachments): _save_batch_sql(threads=threads, attachments=attachments)
    for threads in (False, True)
    for attachments in (False, True)
}
SAVE_BATCH = _STATEMENTS[True, True]
#: Parameters of the variants without attachments: the first 24.
_WITHOUT_ATTACHMENTS = 24


@attrs.frozen
class MessageRows:
    """One message's share of :data:`SAVE_BATCH`'s arrays."""

    email: tuple[object, ...]
    headers: tuple[tuple[object, ...], ...]
    envelope: tuple[tuple[object, ...], ...]
    attachments: tuple[tuple[object, ...], ...]
    keys: frozenset[str]

    @property
    def email_id(self) -> uuid.UUID:
        return cast(uuid.UUID, self.email[0])


def message_rows(email: NewEmail) -> MessageRows:
    """``email`` (already normalised, :func:`~relate_smtp.storage.values.normalise_email`)
    as its share of the batch's arrays."""
    # Ids are drawn header rows first, then envelope positions, so that a Bcc row (which
    # takes its envelope position's id) sorts after every header row.
    headers = tuple(
        (email.id, new_id(), r.address.lower(), r.address, r.display_name, r.type)
        for r in email.header_recipients
    )
    envelope = tuple(
        (email.id, new_id(), address.lower(), address) for address in email.envelope_recipients
    )
    attachments = tuple(
        (new_id(), email.id, a.file_name, a.content_type, a.size_bytes, a.content)
        for a in email.attachments
    )
    return MessageRows(
        email=(*emails_row(email), bare_message_id(email.in_reply_to)),
        headers=headers,
        envelope=envelope,
        attachments=attachments,
        keys=frozenset(h[2] for h in headers) | frozenset(v[2] for v in envelope),
    )


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to the column arrays ``unnest`` takes (``width`` columns even when empty)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def statement_args(batch: Sequence[MessageRows]) -> list[object]:
    """The 30 parameters of :data:`SAVE_BATCH`."""
    keys: set[str] = set()
    for rows in batch:
        keys |= rows.keys
    return [
        *_columns([rows.email for rows in batch], 13),
        *_columns([h for rows in batch for h in rows.headers], 6),
        *_columns([v for rows in batch for v in rows.envelope], 4),
        list(keys),
        *_columns([a for rows in batch for a in rows.attachments], 6),
    ]


def statement(batch: Sequence[MessageRows]) -> tuple[str, list[object]]:
    """The variant of :data:`SAVE_BATCH` that ``batch`` needs, and its parameters."""
    threads = any(rows.email[-1] is not None for rows in batch)
    attachments = any(rows.attachments for rows in batch)
    args = statement_args(batch)
    return _STATEMENTS[threads, attachments], args if attachments else args[:_WITHOUT_ATTACHMENTS]


async def store_batch(con: asyncpg.Connection, batch: Sequence[MessageRows]) -> list[Outcome]:
    """asyncio side: store ``batch`` with one statement (all or nothing)."""
    sql, args = statement(batch)
    result = {
        row["id"]: SavedEmail(
            id=row["id"], thread_id=row["thread_id"], linked_user_ids=tuple(row["linked"])
        )
        for row in await con.fetch(sql, *args)
    }
    return [result[rows.email_id] for rows in batch]


_FIND_SAVED = """
SELECT e."Id" AS id, e."ThreadId" AS thread_id,
       coalesce(array_agg(DISTINCT r."UserId") FILTER (WHERE r."UserId" IS NOT NULL),
                '{}'::uuid[]) AS linked
FROM "Emails" e LEFT JOIN "EmailRecipients" r ON r."EmailId" = e."Id"
WHERE e."Id" = ANY($1::uuid[])
GROUP BY e."Id", e."ThreadId"
"""


async def find_saved(
    con: asyncpg.Connection, *, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, SavedEmail]:
    """asyncio side: the messages among ``ids`` that are stored, as saves report them."""
    return {
        row["id"]: SavedEmail(
            id=row["id"], thread_id=row["thread_id"], linked_user_ids=tuple(row["linked"])
        )
        for row in await con.fetch(_FIND_SAVED, list(ids))
    }
