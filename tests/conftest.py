"""Fixtures shared across the suite: the embedded store of a test server, TLS material, and
the check that the PostgreSQL test server is up."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relate_smtp.storage.connstring import parse_connection_string
from relate_smtp.storage.sqlite import SqliteStore
from tests.storage.helpers import ADMIN_URL, REACH_TIMEOUT, postgres_unreachable


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where ``tests.e2e.helpers.make_settings`` puts the embedded store."""
    return tmp_path / "relate.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(str(db_path))
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    return context


@pytest.fixture
def postgres_available() -> None:
    """Skip (or fail under CI) before the test starts when the server's port is closed.

    A plain fixture, outside Trio, so the skip keeps its reason; the database-creating
    helpers check again for servers that accept TCP but refuse us.
    """
    admin = parse_connection_string(ADMIN_URL)
    if admin.host is None or admin.host.startswith("/"):
        return  # a Unix socket: leave it to temporary_database()
    try:
        socket.create_connection((admin.host, admin.port), timeout=REACH_TIMEOUT).close()
    except OSError as exc:
        postgres_unreachable(f"{type(exc).__name__}: {exc}")
