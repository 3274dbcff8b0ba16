"""The administrative commands behind ``relate-smtp db|users|keys|mail`` (SPEC §9)."""

from __future__ import annotations

import json
import sys
import uuid

import trio

from relate_smtp.cli import printable
from relate_smtp.config import Settings
from relate_smtp.handlers.apikeys import generate_api_key, hash_api_key, key_prefix
from relate_smtp.storage import AdminStore, StoredEmail
from relate_smtp.storage.opening import open_store


class AdminError(Exception):
    """A command could not be carried out; the message says why."""


async def db_init(settings: Settings) -> None:
    async with open_store(settings) as store:
        await store.init_schema()
    print("database schema is ready", file=sys.stderr)


async def _user_id(store: AdminStore, email: str) -> uuid.UUID:
    user = await store.find_user_by_address(email)
    if user is None:
        raise AdminError(f"no user with address {email!r}")
    return user.id


async def users_add(settings: Settings, email: str, name: str | None, aliases: list[str]) -> None:
    async with open_store(settings) as store:
        user = await store.create_user(email, display_name=name, aliases=aliases)
    print(user.id)


async def keys_create(settings: Settings, email: str, name: str, scopes: list[str]) -> None:
    raw = generate_api_key()
    key_hash = await trio.to_thread.run_sync(hash_api_key, raw)
    async with open_store(settings) as store:
        user_id = await _user_id(store, email)
        key = await store.create_api_key(
            user_id,
            name=name,
            key_hash=key_hash,
            key_prefix=key_prefix(raw),
            scopes=json.dumps(scopes),
        )
    print(f"created key {key.id} for {printable(email)}", file=sys.stderr)
    print(raw)


async def keys_list(settings: Settings, email: str) -> None:
    async with open_store(settings) as store:
        keys = await store.list_api_keys(await _user_id(store, email))
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
        print(
            f"{key.id}  {printable(key.name):<20} {printable(key.key_prefix or '-'):<12}  "
            f"scopes={printable(key.scopes)}  {state}  last used {used}"
        )


async def keys_revoke(settings: Settings, key_id: uuid.UUID) -> None:
    async with open_store(settings) as store:
        if not await store.revoke_api_key(key_id):
            raise AdminError(f"no active key with id {key_id}")
    print(f"revoked key {key_id}", file=sys.stderr)


async def mail_list(settings: Settings, limit: int) -> None:
    async with open_store(settings) as store:
        emails = await store.list_emails(limit)
    for email in emails:
        print(
            f"{email.id}  {email.received_at:%Y-%m-%d %H:%M:%S}  "
            f"{printable(email.from_address):<30.30}  {printable(email.subject):.60}"
        )


async def mail_show(settings: Settings, email_id: uuid.UUID) -> None:
    async with open_store(settings) as store:
        email = await store.get_email(email_id)
    if email is None:
        raise AdminError(f"no message with id {email_id}")
    print(_render(email))


def _render(email: StoredEmail) -> str:
    """One line per header field, each value escaped alone; then the body's own lines."""
    p = printable
    lines = [
        f"Id:          {email.id}",
        f"Message-Id:  {p(email.message_id)}",
        f"From:        {p(email.from_display_name or '')} <{p(email.from_address)}>",
        f"Subject:     {p(email.subject)}",
        f"Received:    {email.received_at.isoformat()}",
        f"Size:        {email.size_bytes}",
        f"In-Reply-To: {p(email.in_reply_to or '-')}",
        f"Thread:      {email.thread_id or '-'}",
    ]
    for recipient in email.recipients:
        linked = f" (user {recipient.user_id})" if recipient.user_id else ""
        lines.append(f"{p(recipient.type) + ':':<13}{p(recipient.address)}{linked}")
    for attachment in email.attachments:
        lines.append(
            f"Attachment:  {p(attachment.file_name)} ({p(attachment.content_type)}, "
            f"{attachment.size_bytes} bytes)"
        )
    lines.append("")
    body = email.text_body if email.text_body is not None else (email.html_body or "")
    lines.append(p(body, multiline=True))
    return "\n".join(lines)
