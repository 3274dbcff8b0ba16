"""What ``relate-smtp serve`` writes to its log: start-up lines, session summaries, level,
and never a secret (SPEC §1, issue 6 "Logging")."""

from __future__ import annotations

import base64
import signal
import smtplib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.e2e.helpers import DB_NAME, ServeProcess, create_account

API_KEY = "internal-api-key-never-logged"
SALT = "salt-never-logged"
PFX_PASSWORD = "pfx-password-never-logged"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.kill()


class _Sink(BaseHTTPRequestHandler):
    received = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
        type(self).received.set()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def api_sink() -> Iterator[tuple[int, threading.Event]]:
    received = threading.Event()
    handler = type("Sink", (_Sink,), {"received": received})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], received
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_trace_logging_shows_sessions_and_never_a_secret(
    tmp_path: Path,
    serve: list[ServeProcess],
    api_sink: tuple[int, threading.Event],
) -> None:
    api_port, notified = api_sink
    alice = create_account(tmp_path, "alice@example.com")
    server = ServeProcess(
        tmp_path,
        f"--Storage:SqlitePath={DB_NAME}",
        "--Logging:LogLevel:Default=Trace",
        f"--Api:BaseUrl=http://127.0.0.1:{api_port}",
        f"--Internal:ApiKey={API_KEY}",
        f"--Security:AuthenticationSalt={SALT}",
        f"--Smtp:CertificatePassword={PFX_PASSWORD}",
    )
    serve.append(server)
    server.wait_listening({"submission", "health"})
    port = server.ports["submission"]
    wrong_key = alice.key[:-4] + "XXXX"

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        smtp.login("alice@example.com", alice.key)
        smtp.sendmail(
            "alice@example.com",
            ["alice@example.com"],
            b"From: alice@example.com\r\nSubject: to myself\r\n\r\nHi\r\n",
        )
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        smtp.user, smtp.password = "alice@example.com", wrong_key
        code, _ = smtp.docmd("AUTH", "LOGIN")
        assert code == 334
        smtp.docmd(base64.b64encode(b"alice@example.com").decode())
        assert smtp.docmd(base64.b64encode(wrong_key.encode()).decode())[0] == 535
    assert notified.wait(10), "the API was not notified"

    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=15) == 0, server.log
    log = server.log
    assert "Starting SMTP server on port 0 (plain)" in log
    assert "Listening: submission on " in log and "Listening: health on 127.0.0.1:" in log
    summaries = [line for line in log.splitlines() if " session " in line]
    assert len(summaries) == 2, summaries
    assert any("user=alice@example.com messages=1 " in line for line in summaries), summaries
    for secret in (
        alice.key,
        wrong_key,
        alice.key[12:],  # the part of a key after its public prefix
        base64.b64encode(f"\0alice@example.com\0{alice.key}".encode()).decode(),
        base64.b64encode(wrong_key.encode()).decode(),
        API_KEY,
        SALT,
        PFX_PASSWORD,
    ):
        assert secret not in log, f"a secret reached the log: {secret[:6]}…"


def test_warning_level_keeps_lifecycle_lines_and_drops_session_lines(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    server = ServeProcess(
        tmp_path, f"--Storage:SqlitePath={DB_NAME}", "--Logging:LogLevel:Default=Warning"
    )
    serve.append(server)
    server.wait_listening({"submission", "health"})
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as smtp:
        smtp.ehlo("client.example")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=15) == 0, server.log
    assert "Shutdown complete" in server.log
    assert " session " not in server.log
    assert " INFO " not in server.log.replace("INFO relate_smtp.lifecycle", "")
