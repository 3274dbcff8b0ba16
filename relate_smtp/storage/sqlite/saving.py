"""Saving mail in SQLite: one message's rows, and a group-commit batch in one
transaction with a savepoint per message, so a bad message is rolled back alone and
fails alone."""

from __future__ import annotations

import functools
import sqlite3
import uuid
from collections.abc import Sequence

from relate_smtp.storage.groupcommit import Outcome
from relate_smtp.storage.ids import new_id
from relate_smtp.storage.records import NewEmail, SavedEmail, emails_row, link_recipients
from relate_smtp.storage.sqlite.connection import (
    in_write_transaction,
    is_lock_error,
    rollback,
    store_error,
)
from relate_smtp.storage.sqlite.queries import (
    INSERT_ATTACHMENT,
    INSERT_EMAIL,
    INSERT_RECIPIENT,
    PARENT,
    column_value,
    opt_uuid_text,
    users_by_address,
)
from relate_smtp.storage.values import bare_message_id


def _thread_id(conn: sqlite3.Connection, in_reply_to: str | None) -> uuid.UUID | None:
    """The parent's ThreadId, else the parent's Id; the original stored ids bare, but a
    bracketed row is matched too."""
    bare = bare_message_id(in_reply_to)
    if bare is None:
        return None
    row = conn.execute(PARENT, (bare, f"<{bare}>")).fetchone()
    if row is None:
        return None
    parent_id, parent_thread = row
    return uuid.UUID(parent_thread if parent_thread is not None else parent_id)


def insert_email(conn: sqlite3.Connection, email: NewEmail) -> SavedEmail:
    users = users_by_address(
        conn,
        [r.address for r in email.header_recipients] + list(email.envelope_recipients),
    )
    rows = link_recipients(email.header_recipients, email.envelope_recipients, users)
    thread_id = _thread_id(conn, email.in_reply_to)
    email_id = str(email.id)
    row = (*emails_row(email), thread_id)
    conn.execute(INSERT_EMAIL, [column_value(value) for value in row])
    conn.executemany(
        INSERT_RECIPIENT,
        [
            (
                str(new_id()),
                email_id,
                r.address,
                r.display_name,
                r.type,
                opt_uuid_text(r.user_id),
            )
            for r in rows
        ],
    )
    conn.executemany(
        INSERT_ATTACHMENT,
        [
            (str(new_id()), email_id, a.file_name, a.content_type, len(a.content), a.content)
            for a in email.attachments
        ],
    )
    linked = tuple(dict.fromkeys(r.user_id for r in rows if r.user_id is not None))
    return SavedEmail(id=email.id, thread_id=thread_id, linked_user_ids=linked)


def _outcome_error(exc: Exception) -> Exception:
    return store_error(exc) if isinstance(exc, sqlite3.Error) else exc


def _save_alone(conn: sqlite3.Connection, email: NewEmail) -> Outcome:
    try:
        return in_write_transaction(functools.partial(insert_email, email=email), conn)
    except Exception as exc:
        return _outcome_error(exc)


def save_batch(conn: sqlite3.Connection, emails: Sequence[NewEmail]) -> list[Outcome]:
    """Store ``emails`` in one transaction, one savepoint each; every message gets its
    own outcome (a record, or the exception its caller should see)."""
    if len(emails) == 1:
        return [_save_alone(conn, emails[0])]
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[Outcome] = []
        for email in emails:
            conn.execute("SAVEPOINT save_email")
            try:
                outcomes.append(insert_email(conn, email))
            except Exception as exc:
                # After SQLITE_FULL, IOERR and the like SQLite may have abandoned the
                # whole transaction; only a surviving one can drop just this message.
                if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK TO save_email")
                outcomes.append(_outcome_error(exc))
            conn.execute("RELEASE save_email")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        rollback(conn)
        if is_lock_error(exc):
            # Another process holds the lock; retrying each message would only wait
            # busy_timeout again per message. Everyone gets a 4xx and retries later.
            return [store_error(exc) for _ in emails]
        # Anything else may be one message's fault (too big for the disk, say): give
        # each its own transaction so the others still get stored.
        return [_save_alone(conn, email) for email in emails]
    return outcomes
