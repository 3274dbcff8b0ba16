"""Start the real server in-process on port 0 and talk to it with smtplib in a thread."""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import bcrypt
import trio

from relate_smtp.app import build_server
from relate_smtp.config import Settings, load_settings
from relate_smtp.handlers.apikeys import generate_api_key, key_prefix
from relate_smtp.runtime.listeners import BoundListener
from relate_smtp.runtime.server import Server
from relate_smtp.storage import AdminStore, User

T = TypeVar("T")

FAST_HASH_ROUNDS = 4


def make_settings(tmp_path: Path, *overrides: str) -> Settings:
    """Settings for a test server: every port 0, nothing read from the real environment."""
    base = [
        "Smtp:Port=0",
        "Smtp:SecurePort=0",
        "HealthCheck:Url=http://127.0.0.1:0",
        f"Storage:SqlitePath={tmp_path / 'relate.db'}",
        "Security:AuthenticationSalt=test-salt",
    ]
    return load_settings(overrides=[*base, *overrides], environ={}, cwd=str(tmp_path))


@attrs.frozen
class RunningServer:
    server: Server
    bound: tuple[BoundListener, ...]

    def port(self, name: str) -> int:
        for item in self.bound:
            if item.name == name:
                return item.port
        raise KeyError(name)


@asynccontextmanager
async def running_server(
    settings: Settings,
    store: AdminStore,
    *,
    tls_context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> AsyncIterator[RunningServer]:
    server = build_server(settings, store=store, tls_context=lambda: tls_context, **kwargs)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve)
        try:
            yield RunningServer(server=server, bound=tuple(bound))
        finally:
            server.shutdown()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@attrs.frozen
class Account:
    user: User
    key: str
    key_id: uuid.UUID


async def add_account(
    store: AdminStore,
    email: str,
    *,
    scopes: Sequence[str] = ("smtp",),
    aliases: Sequence[str] = (),
    name: str | None = None,
    prefix: bool = True,
) -> Account:
    user = await store.create_user(email, display_name=name, aliases=aliases)
    return await add_key(store, user, scopes=scopes, prefix=prefix)


async def add_key(
    store: AdminStore, user: User, *, scopes: Sequence[str] = ("smtp",), prefix: bool = True
) -> Account:
    raw = generate_api_key()
    hashed = bcrypt.hashpw(raw.encode(), bcrypt.gensalt(rounds=FAST_HASH_ROUNDS)).decode()
    key = await store.create_api_key(
        user.id,
        name="test",
        key_hash=hashed,
        key_prefix=key_prefix(raw) if prefix else None,
        scopes=json.dumps(list(scopes)),
    )
    return Account(user=user, key=raw, key_id=key.id)


def client(port: int, *, timeout: float = 10.0) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=timeout)


def client_over_tls(
    port: int, context: ssl.SSLContext, *, timeout: float = 10.0
) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("127.0.0.1", port, timeout=timeout, context=context)


def free_port() -> int:
    """A port that was free a moment ago (for listeners where 0 has another meaning)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
