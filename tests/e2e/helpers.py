"""Helpers for the end-to-end tests.

The real server in-process on port 0, talked to with smtplib in a thread (``make_settings``,
``running_server``, accounts); and for the operations tests raw SMTP over Trio, HTTP
probes of the health listener, PROXY headers, log watching, certificates and a
``serve`` subprocess."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import bcrypt
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from relate_smtp.app import build_server
from relate_smtp.config import Settings, load_settings
from relate_smtp.handlers.apikeys import generate_api_key, key_prefix
from relate_smtp.runtime.listeners import BoundListener
from relate_smtp.runtime.proxy import V2_SIGNATURE
from relate_smtp.runtime.server import Server
from relate_smtp.runtime.tls import LoadedCertificate, generate_dev_certificate
from relate_smtp.storage import AdminStore, User
from relate_smtp.storage.sqlite import SqliteStore

T = TypeVar("T")

FAST_HASH_ROUNDS = 4


# --------------------------------------------------------------------------- in-process server


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


# The host is in brackets when it is IPv6: "[::]:2525", "0.0.0.0:2525".
LISTENING = re.compile(r"Listening: (\S+) on (\[[^\]\s]+\]|[^\s:]+):(\d+) \((\w+)\)")
REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


# --------------------------------------------------------------------------- raw SMTP


class SmtpLineClient:
    """An SMTP client on a Trio stream that sends exactly what it is told to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, port: int, *, prefix: bytes = b"") -> SmtpLineClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if prefix:
            await stream.send_all(prefix)
        return cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def command(self, line: str, *, timeout: float = 10.0) -> tuple[int, str]:  # noqa: ASYNC109
        await self.send(line.encode() + b"\r\n")
        return await self.reply(timeout=timeout)

    async def reply(self, *, timeout: float = 10.0) -> tuple[int, str]:  # noqa: ASYNC109
        """The next (possibly multi-line) reply: its code and its last line's text."""
        with trio.fail_after(timeout):
            while True:
                line = await self._line()
                match = REPLY_LINE.match(line)
                assert match is not None, f"not an SMTP reply line: {line!r}"
                if match.group(2) == b" ":
                    return int(match.group(1)), match.group(3).decode()

    async def at_eof(self, *, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """True when the server closed the connection with nothing more to say."""
        with trio.fail_after(timeout):
            if self._buffer:
                return False
            try:
                data = await self.stream.receive_some(4096)
            except trio.BrokenResourceError:
                return True  # reset by the peer
            self._buffer += data
            return not data

    async def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError(f"connection closed; unread: {bytes(self._buffer)!r}")
            self._buffer += data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# --------------------------------------------------------------------------- PROXY headers


def proxy_v1(client_ip: str, client_port: int = 40000, server_port: int = 587) -> bytes:
    family = "TCP6" if ":" in client_ip else "TCP4"
    server_ip = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client_ip} {server_ip} {client_port} {server_port}\r\n".encode()


def proxy_v2(client_ip: str, client_port: int = 40000, server_port: int = 587) -> bytes:
    client = ipaddress.ip_address(client_ip)
    if client.version == 4:
        server = ipaddress.ip_address("127.0.0.1")
        fam_proto, fmt = 0x11, "!4s4sHH"
    else:
        server = ipaddress.ip_address("::1")
        fam_proto, fmt = 0x21, "!16s16sHH"
    addresses = struct.pack(fmt, client.packed, server.packed, client_port, server_port)
    return V2_SIGNATURE + bytes([0x21, fam_proto]) + struct.pack("!H", len(addresses)) + addresses


# --------------------------------------------------------------------------- health listener


async def http_get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


async def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` by name (labels folded into the key)."""
    response = await http_get(port, "/metrics")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# --------------------------------------------------------------------------- logs


class LogWatcher(logging.Handler):
    """Collects records of a logger; ``wait_for`` wakes on the record, no polling.

    Records emitted from other threads are collected too; those wake the waiter through
    the Trio token captured at creation.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if threading.get_ident() == self._thread:
            self._changed.set()
        else:
            self._token.run_sync_soon(self._changed.set)

    def matching(self, pattern: str) -> list[str]:
        return [m for m in self.messages if re.search(pattern, m)]

    async def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while len(found := self.matching(pattern)) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        return found


@contextmanager
def watch_log(name: str, level: int = logging.INFO) -> Iterator[LogWatcher]:
    logger = logging.getLogger(name)
    watcher = LogWatcher()
    old_level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(min(level, old_level) if old_level else level)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)


# --------------------------------------------------------------------------- certificates


def write_certificate(path: Path, *, days: int, hostname: str = "localhost") -> LoadedCertificate:
    """A self-signed PEM (certificate and key in one file), replaced atomically."""
    certificate = generate_dev_certificate(hostname, valid_days=days)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(certificate.chain_pem + certificate.key_pem)
    os.replace(temporary, path)
    return certificate


def peer_thumbprint_implicit(port: int) -> str:
    """SHA-1 (upper-case hex) of the certificate presented on an implicit-TLS port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha1(der).hexdigest().upper()


# --------------------------------------------------------------------------- subprocess

DB_NAME = "relate.db"


def create_account(cwd: Path, email: str) -> Account:
    """A user with an SMTP key in ``cwd/DB_NAME``, made before the server starts."""

    async def create() -> Account:
        store = await SqliteStore.open(str(cwd / DB_NAME))
        try:
            return await add_account(store, email)
        finally:
            await store.aclose()

    return trio.run(create)


def cli_env() -> dict[str, str]:
    prefixes = ("Smtp__", "Storage__", "HealthCheck__", "Api__", "Internal__", "Logging__")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "relate_smtp", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}): {result.stderr}"
    return result


class ServeProcess:
    """``relate-smtp serve`` in ``cwd``; its stderr is read by a thread into ``lines``."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relate_smtp",
                "serve",
                "--Smtp:Port=0",
                "--Smtp:SecurePort=0",
                "--HealthCheck:Url=http://127.0.0.1:0",
                "--HealthCheck:DnsMxDomain=",
                *args,
            ],
            cwd=cwd,
            env=cli_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.ports[match.group(1)] = int(match.group(3))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 15.0) -> list[str]:
        """Block until ``count`` stderr lines match ``pattern``; fail on exit or timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "exited" if self._eof else "timed out"
                    raise AssertionError(f"{why} waiting for {pattern!r}:\n" + "".join(self.lines))
                self._cond.wait(remaining)

    def wait_listening(self, names: set[str], timeout: float = 30.0) -> None:
        for name in names:
            self.wait_for(rf"Listening: {re.escape(name)} on ", timeout=timeout)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
