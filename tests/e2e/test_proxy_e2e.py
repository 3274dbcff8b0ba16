"""PROXY protocol and connection limits through the running server (SPEC §2, §10)."""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    LogWatcher,
    SmtpLineClient,
    add_account,
    free_port,
    http_get,
    make_settings,
    proxy_v1,
    proxy_v2,
    running_server,
    watch_log,
)

PROXIED = (
    "Smtp:ProxyProtocol:Listeners:0=submission",
    "Smtp:ProxyProtocol:TrustedNetworks:0=127.0.0.0/8",
    "HealthCheck:DnsMxDomain=",
)
LOCKOUT = (
    "Security:RateLimit:MaxFailedAttempts=3",
    "Security:RateLimit:BaseBackoffDelay=0",
)
SESSION_LOG = "relate_smtp.session"


def plain(username: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode()).decode()


async def greeted(port: int, prefix: bytes = b"") -> SmtpLineClient:
    smtp = await SmtpLineClient.connect(port, prefix=prefix)
    code, text = await smtp.reply()
    assert code == 220, (code, text)
    return smtp


async def auth_from(port: int, header: bytes, username: str, password: str) -> tuple[int, str]:
    smtp = await greeted(port, header)
    try:
        assert (await smtp.command("EHLO client.example"))[0] == 250
        return await smtp.command(plain(username, password))
    finally:
        await smtp.aclose()


@pytest.mark.parametrize(
    "header",
    [pytest.param(proxy_v1, id="v1"), pytest.param(proxy_v2, id="v2")],
)
async def test_proxy_header_sets_the_address_the_rate_limiter_sees(
    tmp_path: Path, store: SqliteStore, header: Callable[[str], bytes]
) -> None:
    account = await add_account(store, "alice@example.com")
    settings = make_settings(tmp_path, *PROXIED, *LOCKOUT)
    with watch_log(SESSION_LOG) as session_log:
        async with running_server(settings, store) as running:
            port = running.port("submission")
            for _ in range(3):
                code, _ = await auth_from(port, header("203.0.113.7"), "alice@example.com", "bad")
                assert code == 535
            # Locked out: even the right key is refused for the announced address…
            code, text = await auth_from(
                port, header("203.0.113.7"), "alice@example.com", account.key
            )
            assert (code, text[:5]) == (454, "4.7.0")
            # …while another client behind the same balancer (same socket peer) is not.
            code, _ = await auth_from(port, header("203.0.113.8"), "alice@example.com", account.key)
            assert code == 235
            await session_log.wait_for(r"^session ", count=5)
    summaries = session_log.matching(r"^session ")
    assert sum(line.startswith("session 203.0.113.7:40000 ") for line in summaries) == 4
    assert sum(line.startswith("session 203.0.113.8:40000 ") for line in summaries) == 1


async def test_proxy_v2_ipv6_clients_are_rate_limited_per_64(
    tmp_path: Path, store: SqliteStore
) -> None:
    """One IPv6 host can take any address of its /64: failures from one address lock
    its neighbours out too, while the next /64 is another client."""
    account = await add_account(store, "alice@example.com")
    settings = make_settings(tmp_path, *PROXIED, *LOCKOUT)
    async with running_server(settings, store) as running:
        port = running.port("submission")
        for _ in range(3):
            code, _ = await auth_from(port, proxy_v2("2001:db8:a:b::7"), "alice@example.com", "bad")
            assert code == 535
        locked = await auth_from(
            port, proxy_v2("2001:db8:a:b::7"), "alice@example.com", account.key
        )
        neighbour = await auth_from(
            port, proxy_v2("2001:db8:a:b:9:8:7:6"), "alice@example.com", account.key
        )
        other = await auth_from(port, proxy_v2("2001:db8:a:c::7"), "alice@example.com", account.key)
    assert (locked[0], locked[1][:5]) == (454, "4.7.0")
    assert (neighbour[0], neighbour[1][:5]) == (454, "4.7.0")
    assert other[0] == 235


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"EHLO client.example\r\n", id="smtp-first"),
        pytest.param(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000\r\n", id="v1-missing-port"),
        pytest.param(b"PROXY TCP4 999.0.113.7 127.0.0.1 40000 587\r\n", id="v1-bad-address"),
        pytest.param(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 587\n", id="v1-bare-lf"),
        pytest.param(proxy_v2("203.0.113.7")[:12] + b"\x99\x11\x00\x0c" + bytes(12), id="v2-ver"),
    ],
)
async def test_missing_or_malformed_header_closes_without_a_greeting(
    tmp_path: Path, store: SqliteStore, opening: bytes
) -> None:
    settings = make_settings(tmp_path, *PROXIED)
    async with running_server(settings, store) as running:
        smtp = await SmtpLineClient.connect(running.port("submission"), prefix=opening)
        try:
            assert await smtp.at_eof(timeout=5)
        finally:
            await smtp.aclose()


async def test_silent_client_is_closed_after_the_header_timeout(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, *PROXIED, "Smtp:TlsHandshakeTimeoutSeconds=0.5")
    async with running_server(settings, store) as running:
        smtp = await SmtpLineClient.connect(running.port("submission"))
        try:
            assert await smtp.at_eof(timeout=5)
        finally:
            await smtp.aclose()


async def test_untrusted_peer_is_closed_even_with_a_valid_header(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(
        tmp_path,
        "Smtp:ProxyProtocol:Listeners:0=submission",
        "Smtp:ProxyProtocol:TrustedNetworks:0=10.0.0.0/8",
        "HealthCheck:DnsMxDomain=",
    )
    with watch_log("relate_smtp.server", logging.WARNING) as server_log:
        async with running_server(settings, store) as running:
            smtp = await SmtpLineClient.connect(
                running.port("submission"), prefix=proxy_v1("203.0.113.7")
            )
            try:
                assert await smtp.at_eof(timeout=5)
            finally:
                await smtp.aclose()
            await server_log.wait_for(r"TrustedNetworks")


async def test_healthz_smtp_check_passes_through_a_proxied_listener(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, *PROXIED)
    async with running_server(settings, store) as running:
        response = await http_get(running.port("health"), "/healthz")
    smtp = next(check for check in response.json()["checks"] if check["name"] == "smtp")
    assert smtp["status"] == "Healthy", smtp


class HeaderFirst(trio.abc.Stream):
    """Sends ``header`` in the same write as the first bytes sent (the ClientHello)."""

    def __init__(self, inner: trio.SocketStream, header: bytes) -> None:
        self._inner = inner
        self._header = header

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        header, self._header = self._header, b""
        await self._inner.send_all(header + bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize(
    "header",
    [pytest.param(proxy_v1, id="v1"), pytest.param(proxy_v2, id="v2")],
)
async def test_proxy_header_on_implicit_tls_in_one_segment_with_the_client_hello(
    tmp_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    header: Callable[[str], bytes],
) -> None:
    settings = make_settings(
        tmp_path,
        f"Smtp:SecurePort={free_port()}",
        "Smtp:ProxyProtocol:Listeners:0=submission-tls",
        "Smtp:ProxyProtocol:TrustedNetworks:0=127.0.0.0/8",
        "HealthCheck:DnsMxDomain=",
    )
    with watch_log(SESSION_LOG) as session_log:
        async with running_server(settings, store, tls_context=server_tls) as running:
            raw = await trio.open_tcp_stream("127.0.0.1", running.port("submission-tls"))
            tls_stream = trio.SSLStream(
                HeaderFirst(raw, header("198.51.100.4")), client_tls, server_hostname="localhost"
            )
            smtp = SmtpLineClient(tls_stream)
            try:
                assert (await smtp.reply())[0] == 220
                assert (await smtp.command("EHLO client.example"))[0] == 250
                assert (await smtp.command("QUIT"))[0] == 221
            finally:
                await smtp.aclose()
            [summary] = await session_log.wait_for(r"^session ")
    assert summary.startswith("session 198.51.100.4:40000 listener=submission-tls tls=yes ")


# --------------------------------------------------------------------------- limits

PER_IP = ("Smtp:MaxConnectionsPerIp=2", "Smtp:ConnectionLimitExemptNetworks:0=10.0.0.0/8")


async def assert_refused(port: int, prefix: bytes = b"") -> None:
    smtp = await SmtpLineClient.connect(port, prefix=prefix)
    try:
        code, text = await smtp.reply()
        assert (code, text[:5]) == (421, "4.7.0"), (code, text)
        assert await smtp.at_eof()
    finally:
        await smtp.aclose()


async def close_and_wait(smtp: SmtpLineClient, session_log: LogWatcher, count: int) -> None:
    """QUIT, and wait until the server has finished the session (its summary line)."""
    assert (await smtp.command("QUIT"))[0] == 221
    await smtp.aclose()
    await session_log.wait_for(r"^session ", count=count)


async def test_per_ip_limit_refuses_the_third_connection_until_one_closes(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, *PER_IP, "HealthCheck:DnsMxDomain=")
    with watch_log(SESSION_LOG) as session_log:
        async with running_server(settings, store) as running:
            port = running.port("submission")
            first, second = await greeted(port), await greeted(port)
            await assert_refused(port)
            await close_and_wait(first, session_log, count=1)
            third = await greeted(port)
            await assert_refused(port)
            for smtp in (second, third):
                await smtp.aclose()


async def test_per_ip_limit_applies_to_the_proxied_address_and_spares_exempt_ones(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, *PER_IP, *PROXIED)
    async with running_server(settings, store) as running:
        port = running.port("submission")
        open_sessions = [
            await greeted(port, proxy_v1("203.0.113.7")),
            await greeted(port, proxy_v2("203.0.113.7")),
        ]
        await assert_refused(port, proxy_v1("203.0.113.7"))
        # Other clients behind the same balancer are counted on their own…
        open_sessions += [await greeted(port, proxy_v1("203.0.113.8")) for _ in range(2)]
        # …and an exempt client is never refused for its address.
        open_sessions += [await greeted(port, proxy_v2("10.1.2.3")) for _ in range(3)]
        for smtp in open_sessions:
            await smtp.aclose()


async def test_per_ip_limit_counts_an_ipv6_64_as_one_client(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(
        tmp_path,
        *PROXIED,
        "Smtp:MaxConnectionsPerIp=2",
        "Smtp:ConnectionLimitExemptNetworks:0=2001:db8:1:2::99",
    )
    async with running_server(settings, store) as running:
        port = running.port("submission")
        open_sessions = [
            await greeted(port, proxy_v2("2001:db8:1:2::1")),
            await greeted(port, proxy_v2("2001:db8:1:2::2")),
        ]
        # A third address of the same /64 is the same client…
        await assert_refused(port, proxy_v2("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        # …the next /64 is another one…
        open_sessions.append(await greeted(port, proxy_v2("2001:db8:1:3::1")))
        # …and exemption is judged on the address itself, not its /64.
        open_sessions += [await greeted(port, proxy_v2("2001:db8:1:2::99")) for _ in range(3)]
        for smtp in open_sessions:
            await smtp.aclose()


async def test_loopback_is_exempt_by_default(tmp_path: Path, store: SqliteStore) -> None:
    settings = make_settings(tmp_path, "Smtp:MaxConnectionsPerIp=2", "HealthCheck:DnsMxDomain=")
    async with running_server(settings, store) as running:
        port = running.port("submission")
        open_sessions = [await greeted(port) for _ in range(4)]
        for smtp in open_sessions:
            await smtp.aclose()


async def test_overall_limit_refuses_beyond_max_connections(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(
        tmp_path, "Smtp:MaxConnections=2", "Smtp:MaxConnectionsPerIp=0", "HealthCheck:DnsMxDomain="
    )
    with watch_log(SESSION_LOG) as session_log:
        async with running_server(settings, store) as running:
            port = running.port("submission")
            first, second = await greeted(port), await greeted(port)
            await assert_refused(port)
            await close_and_wait(first, session_log, count=1)
            third = await greeted(port)
            await assert_refused(port)
            for smtp in (second, third):
                await smtp.aclose()


async def test_refusals_are_counted_in_metrics(tmp_path: Path, store: SqliteStore) -> None:
    settings = make_settings(tmp_path, "Smtp:MaxConnections=1", "HealthCheck:DnsMxDomain=")
    async with running_server(settings, store) as running:
        port = running.port("submission")
        first = await greeted(port)
        await assert_refused(port)
        response = await http_get(running.port("health"), "/metrics")
        await first.aclose()
    assert 'smtp_rejections_total{reason="too_many_connections"} 1.0' in response.text


async def test_refusal_on_the_implicit_tls_listener_sends_no_plaintext(
    tmp_path: Path, store: SqliteStore, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    settings = make_settings(
        tmp_path,
        f"Smtp:SecurePort={free_port()}",
        "Smtp:MaxConnections=1",
        "HealthCheck:DnsMxDomain=",
    )
    async with running_server(settings, store, tls_context=server_tls) as running:
        port = running.port("submission-tls")

        async def tls_client() -> SmtpLineClient:
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            return SmtpLineClient(trio.SSLStream(raw, client_tls, server_hostname="localhost"))

        first = await tls_client()
        assert (await first.reply())[0] == 220
        # Over the limit the server closes without writing: a plaintext 421 would only
        # break the client's handshake, and a handshake costs an overloaded server CPU.
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            with trio.fail_after(5):
                assert await raw.receive_some(1024) == b""
        finally:
            await raw.aclose()
            await first.aclose()
