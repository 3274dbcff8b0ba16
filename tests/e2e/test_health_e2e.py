"""``/healthz``, ``/metrics`` and the per-session log line, through the running server."""

from __future__ import annotations

import base64
import logging
import re
import sys
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relate_smtp.runtime.health import FIRST_BYTE_TIMEOUT
from relate_smtp.runtime.tls import CertificateStore
from relate_smtp.storage.postgres import open_postgres_store
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    SmtpLineClient,
    add_account,
    client,
    free_port,
    http_get,
    in_thread,
    make_settings,
    running_server,
    scrape,
    write_certificate,
)

CHECK_NAMES = {
    "database",
    "connection-pool",
    "disk-space",
    "memory",
    "smtp",
    "dns-mx",
    "certificate",
}
ORIGINAL_ORDER = (
    "database",
    "disk-space",
    "memory",
    "connection-pool",
    "smtp",
    "dns-mx",
    "certificate",
)
CHECK_TAGS = {
    "database": ["infrastructure"],
    "connection-pool": ["database"],
    "disk-space": ["system"],
    "memory": ["system"],
    "smtp": ["protocol"],
    "dns-mx": ["smtp"],
    "certificate": ["tls"],
}
# A reserved name (RFC 2606): the lookup fails or finds nothing, offline or not.
NO_MX_DOMAIN = "relate-smtp-test.invalid"
IDLE_SOCKETS = 100
PROBES = 10
# Shorter than the health endpoint's first-byte timeout: a probe must be answered while
# the idle sockets are still open, not once they have timed out.
PROBE_DEADLINE = FIRST_BYTE_TIMEOUT * 0.75
# Every idle socket is closed by the first-byte timeout at the latest; the rest is slack.
IDLE_CLOSED_DEADLINE = FIRST_BYTE_TIMEOUT + 8


def message(subject: str = "Hello") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg.set_content("Hi Bob,\n\nthis is a test.\n")
    return msg.as_bytes()


def checks_by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in document["checks"]}


def assert_report_shape(document: dict[str, Any]) -> None:
    assert set(document) == {"status", "totalDuration", "checks"}
    assert document["status"] in {"Healthy", "Degraded", "Unhealthy"}
    assert isinstance(document["totalDuration"], int | float)
    assert not isinstance(document["totalDuration"], bool)
    for check in document["checks"]:
        assert set(check) == {
            "name",
            "status",
            "duration",
            "description",
            "exception",
            "tags",
            "data",
        }, check
        assert check["status"] in {"Healthy", "Degraded", "Unhealthy"}
        assert isinstance(check["duration"], int | float) and check["duration"] >= 0
        assert check["description"] is None or isinstance(check["description"], str)
        assert check["exception"] is None or isinstance(check["exception"], str)
        assert isinstance(check["tags"], list) and all(isinstance(t, str) for t in check["tags"])
        assert check["data"] is None or isinstance(check["data"], dict)
    severity = {"Healthy": 0, "Degraded": 1, "Unhealthy": 2}
    worst = max(document["checks"], key=lambda c: severity[c["status"]])["status"]
    assert document["status"] == worst


async def test_healthz_reports_every_check_in_the_original_format(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, f"HealthCheck:DnsMxDomain={NO_MX_DOMAIN}")
    async with running_server(settings, store) as running:
        response = await http_get(running.port("health"), "/healthz")
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert_report_shape(document)
    checks = checks_by_name(document)
    assert set(checks) == CHECK_NAMES
    assert len(document["checks"]) == len(CHECK_NAMES)
    # The original's registration order, which its JSON keeps.
    assert [c["name"] for c in document["checks"]] == list(ORIGINAL_ORDER)
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert checks["dns-mx"]["data"] == {"testDomain": NO_MX_DOMAIN, "mxRecordCount": 0} or (
        checks["dns-mx"]["description"] == "DNS MX resolution failed"
    )
    for name, tags in CHECK_TAGS.items():
        assert checks[name]["tags"] == tags, name
    for name in ("database", "connection-pool", "smtp", "certificate"):
        assert checks[name]["status"] == "Healthy", checks[name]
    # The embedded store has no server whose connections could run out (SPEC §7).
    assert checks["connection-pool"]["data"] == {"backend": "sqlite"}
    assert set(checks["disk-space"]["data"]) == {"availableGB", "totalGB", "usedPercent"}
    assert set(checks["memory"]["data"]) == {"workingSetMB"}
    assert checks["memory"]["data"]["workingSetMB"] > 0
    # No MX records or no DNS at all: Degraded, never Unhealthy (SPEC §7).
    assert checks["dns-mx"]["status"] == "Degraded"
    assert document["status"] == "Degraded"
    assert response.status_code == 200


async def test_healthz_without_dns_domain_omits_dns_mx_and_is_healthy(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    async with running_server(settings, store) as running:
        response = await http_get(running.port("health"), "/healthz")
    document = response.json()
    assert_report_shape(document)
    assert set(checks_by_name(document)) == CHECK_NAMES - {"dns-mx"}
    # disk-space and memory depend on the machine; the rest must be Healthy here.
    statuses = {c["name"]: c["status"] for c in document["checks"]}
    assert statuses["database"] == statuses["smtp"] == statuses["certificate"] == "Healthy"
    assert response.status_code == 200


async def probe_status(host: str, port: int) -> int:
    """The /healthz status code over one address family (``host`` is an IP literal)."""
    literal = f"[{host}]" if ":" in host else host
    async with httpx.AsyncClient(timeout=20) as http:
        return (await http.get(f"http://{literal}:{port}/healthz")).status_code


@pytest.mark.parametrize("wildcard", ["+", "*", "0.0.0.0", "[::]", "health.example"])
async def test_wildcard_health_url_serves_ipv4_and_ipv6_on_one_socket(
    tmp_path: Path, store: SqliteStore, wildcard: str
) -> None:
    """Kestrel's reading of HealthCheck:Url: a wildcard or a name is every interface of
    both families, so a probe over ::1 (a dual-stack kubelet) reaches it too."""
    settings = make_settings(
        tmp_path, f"HealthCheck:Url=http://{wildcard}:0", "HealthCheck:DnsMxDomain="
    )
    async with running_server(settings, store) as running:
        health = [item for item in running.bound if item.name == "health"]
        port = running.port("health")
        statuses = [await probe_status(host, port) for host in ("127.0.0.1", "::1")]
    assert [(item.host, item.tls) for item in health] == [("::", "none")]
    assert statuses == [200, 200]


async def test_localhost_health_url_serves_both_loopbacks_on_one_port(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(
        tmp_path, "HealthCheck:Url=http://localhost:0", "HealthCheck:DnsMxDomain="
    )
    async with running_server(settings, store) as running:
        health = [(item.host, item.port) for item in running.bound if item.name == "health"]
        statuses = [await probe_status(host, port) for host, port in health]
    assert [host for host, _ in health] == ["127.0.0.1", "::1"]
    assert len({port for _, port in health}) == 1
    assert statuses == [200, 200]


async def test_health_urls_separated_by_semicolons_are_all_served(
    tmp_path: Path, store: SqliteStore
) -> None:
    settings = make_settings(
        tmp_path,
        "HealthCheck:Url=http://127.0.0.1:0; http://[::1]:0",
        "HealthCheck:DnsMxDomain=",
    )
    async with running_server(settings, store) as running:
        health = [(item.host, item.port) for item in running.bound if item.name == "health"]
        statuses = [await probe_status(host, port) for host, port in health]
    assert [host for host, _ in health] == ["127.0.0.1", "::1"]
    assert statuses == [200, 200]


async def test_database_down_is_unhealthy_503_and_smtp_answers_4xx(tmp_path: Path) -> None:
    closed = free_port()
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    connection = f"Host=127.0.0.1;Port={closed};Database=x;Username=postgres;Timeout=2"
    async with (
        open_postgres_store(connection) as pg,
        running_server(settings, pg) as running,
    ):
        response = await http_get(running.port("health"), "/healthz")
        smtp = await SmtpLineClient.connect(running.port("submission"))
        try:
            assert (await smtp.reply())[0] == 220
            assert (await smtp.command("EHLO client.example"))[0] == 250
            token = base64.b64encode(b"\0alice@example.com\0not-a-key").decode()
            code, text = await smtp.command(f"AUTH PLAIN {token}")
        finally:
            await smtp.aclose()
    assert response.status_code == 503
    document = response.json()
    assert_report_shape(document)
    assert document["status"] == "Unhealthy"
    database = checks_by_name(document)["database"]
    assert database["status"] == "Unhealthy"
    assert database["exception"]
    assert "Traceback" not in database["exception"]
    assert code == 454 and text.startswith("4.7.0"), (code, text)


async def test_certificate_near_expiry_is_degraded(tmp_path: Path, store: SqliteStore) -> None:
    pem = tmp_path / "cert.pem"
    loaded = write_certificate(pem, days=20)
    certificates = CertificateStore.from_files(str(pem))
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    async with running_server(
        settings,
        store,
        tls_context=certificates.context,
        certificate_health=lambda: certificates.status(datetime.now(UTC)),
    ) as running:
        response = await http_get(running.port("health"), "/healthz")
    assert response.status_code == 200
    document = response.json()
    assert_report_shape(document)
    certificate = checks_by_name(document)["certificate"]
    assert certificate["status"] == "Degraded", certificate
    data = certificate["data"]
    assert set(data) == {"subject", "notBefore", "notAfter", "daysUntilExpiry", "thumbprint"}
    assert 19 < data["daysUntilExpiry"] <= 20
    assert data["thumbprint"] == loaded.info.thumbprint
    assert re.fullmatch(r"[0-9A-F]{40}", data["thumbprint"])
    datetime.fromisoformat(data["notAfter"])
    assert document["status"] in {"Degraded", "Unhealthy"}  # at least the certificate's


async def test_expiring_within_a_week_is_unhealthy_503(tmp_path: Path, store: SqliteStore) -> None:
    pem = tmp_path / "cert.pem"
    write_certificate(pem, days=3)
    certificates = CertificateStore.from_files(str(pem))
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    async with running_server(
        settings,
        store,
        tls_context=certificates.context,
        certificate_health=lambda: certificates.status(datetime.now(UTC)),
    ) as running:
        response = await http_get(running.port("health"), "/healthz")
    assert checks_by_name(response.json())["certificate"]["status"] == "Unhealthy"
    assert response.status_code == 503


async def test_metrics_move_after_traffic(tmp_path: Path, store: SqliteStore) -> None:
    account = await add_account(store, "alice@example.com", name="Alice")
    body = message()
    settings = make_settings(
        tmp_path, "HealthCheck:DnsMxDomain=", "Security:RateLimit:BaseBackoffDelay=0"
    )
    async with running_server(settings, store) as running:
        health = running.port("health")
        port = running.port("submission")
        before = await scrape(health)

        def traffic() -> None:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                token = base64.b64encode(b"\0alice@example.com\0wrong-key").decode()
                assert smtp.docmd("AUTH", f"PLAIN {token}")[0] == 535
            with client(port) as smtp:
                smtp.ehlo("client.example")
                smtp.login("alice@example.com", account.key)
                smtp.sendmail("alice@example.com", ["bob@example.org"], body)

        await in_thread(traffic)
        idle = await SmtpLineClient.connect(port)
        try:
            assert (await idle.reply())[0] == 220
            during = await scrape(health)
        finally:
            await idle.aclose()

    def delta(name: str) -> float:
        return during.get(name, 0.0) - before.get(name, 0.0)

    stored = await store.list_emails(10)
    assert len(stored) == 1
    assert delta("smtp_messages_received_total") == 1
    # The counter takes every octet received; SizeBytes leaves out the last CRLF.
    assert delta("smtp_bytes_received_total") == stored[0].size_bytes + 2 > 2
    assert delta("smtp_auth_attempts_total") == 2
    assert delta("smtp_auth_failures_total") == 1
    assert delta("smtp_message_processing_duration_seconds_count") == 1
    assert delta("smtp_message_processing_duration_seconds_sum") > 0
    assert before["smtp_active_connections"] == 0
    assert during["smtp_active_connections"] == 1


async def test_one_summary_line_per_session(
    tmp_path: Path, store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relate_smtp.session")
    account = await add_account(store, "alice@example.com")
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    body = message()
    async with running_server(settings, store) as running:
        port = running.port("submission")

        def send_two() -> int:
            with client(port) as smtp:
                smtp.ehlo("client.example")
                smtp.login("alice@example.com", account.key)
                smtp.sendmail("alice@example.com", ["bob@example.org"], body)
                smtp.sendmail("alice@example.com", ["bob@example.org"], body)
                assert smtp.sock is not None
                return int(smtp.sock.getsockname()[1])

        local_port = await in_thread(send_two)
        anonymous = await SmtpLineClient.connect(port)
        assert (await anonymous.reply())[0] == 220
        await anonymous.aclose()
    # Leaving running_server waited for every session to end, so every line is logged.
    summaries = [
        r.getMessage()
        for r in caplog.records
        if r.name == "relate_smtp.session" and r.getMessage().startswith("session ")
    ]
    assert len(summaries) == 2, summaries
    mine = [line for line in summaries if line.startswith(f"session 127.0.0.1:{local_port} ")]
    assert len(mine) == 1, summaries
    stored = await store.list_emails(10)
    total = sum(email.size_bytes + 2 for email in stored)  # the log counts the last CRLF too
    assert re.fullmatch(
        rf"session 127\.0\.0\.1:{local_port} listener=submission tls=no "
        rf"user=alice@example\.com messages=2 bytes={total} outcome=quit",
        mine[0],
    ), mine[0]
    other = next(line for line in summaries if line not in mine)
    assert "user=- messages=0 bytes=0" in other
    assert account.key not in caplog.text


async def probes_answered(port: int) -> int:
    """How many of ``PROBES`` fresh-connection probes got a 200 within the deadline."""
    answered = 0
    for _ in range(PROBES):
        with trio.move_on_after(PROBE_DEADLINE):
            try:
                async with httpx.AsyncClient(timeout=None) as http:
                    response = await http.get(f"http://127.0.0.1:{port}/healthz")
            except httpx.TransportError:
                continue
            answered += response.status_code == 200
    return answered


async def wait_closed_by_server(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass  # reset rather than FIN: closed all the same


@pytest.mark.parametrize(
    "spread",
    [
        pytest.param(False, id="one-client"),
        pytest.param(
            True,
            id="many-clients",
            # Only Linux routes all of 127.0.0.0/8 to the loopback interface.
            marks=pytest.mark.skipif(sys.platform != "linux", reason="needs 127.0.0.0/8"),
        ),
    ],
)
async def test_idle_connections_do_not_starve_probes(
    tmp_path: Path, store: SqliteStore, spread: bool
) -> None:
    """A hundred sockets that never send a byte: every probe is still answered at once,
    and the idle sockets are closed by the server, not left to pile up."""
    settings = make_settings(tmp_path, "HealthCheck:DnsMxDomain=")
    async with running_server(settings, store) as running:
        port = running.port("health")
        sources = [f"127.0.0.{2 + i if spread else 1}" for i in range(IDLE_SOCKETS)]
        idle = [
            await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            for source in sources
        ]
        try:
            assert await probes_answered(port) == PROBES
            with trio.fail_after(IDLE_CLOSED_DEADLINE):
                for stream in idle:
                    await wait_closed_by_server(stream)
        finally:
            for stream in idle:
                await trio.aclose_forcefully(stream)


async def test_metrics_show_the_buffer_budget_and_what_waits(
    tmp_path: Path, store: SqliteStore
) -> None:
    """A large message that finds the budget full waits (its 250 with it), shows in
    /metrics while it waits, and is stored once room is made."""
    settings = make_settings(
        tmp_path,
        "HealthCheck:DnsMxDomain=",
        "Smtp:RequireAuthentication=false",
        "Smtp:MaxBufferedBytes=1000000",
    )
    body = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 2000  # 156 KB: parsed off-loop
    async with running_server(settings, store) as running:
        health, port = running.port("health"), running.port("submission")
        idle = await scrape(health)
        peer = await SmtpLineClient.connect(port)
        try:
            assert (await peer.reply())[0] == 220
            await peer.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
            for _ in range(3):
                await peer.reply()
            async with running.server.budget.hold(1_000_000, timeout=0):
                assert (await peer.command("DATA"))[0] == 354
                await peer.send(body + b".\r\n")
                with trio.fail_after(10):
                    # The session joins the queue once its bytes have crossed the socket.
                    while running.server.budget.waiting == 0:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                waiting = await scrape(health)
            assert (await peer.reply())[0] == 250
        finally:
            await peer.aclose()
    assert idle["smtp_buffer_budget_bytes"] == 1_000_000
    assert (idle["smtp_buffer_held_bytes"], idle["smtp_buffer_waiting_bytes"]) == (0, 0)
    assert waiting["smtp_buffer_held_bytes"] == 1_000_000
    assert waiting["smtp_buffer_waiting_bytes"] == 2 * len(body)
    assert len(await store.list_emails(10)) == 1
