"""``serve --workers N``: shared listeners, aggregated metrics, restarts, clean stop."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

from tests.e2e.test_cli import ServeProcess, run_cli

WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def send(port: int, count: int, tag: str) -> None:
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail(
                "a@example.com",
                ["b@example.org"],
                f"Subject: {tag} {i}\r\n\r\nhello\r\n".encode(),
            )


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_log(server: ServeProcess, pattern: re.Pattern[str], count: int) -> list[str]:
    """Read stderr until ``pattern`` has matched ``count`` lines in all."""
    assert server.proc.stderr is not None
    deadline = time.monotonic() + 30
    while len(matches := [line for line in server.lines if pattern.search(line)]) < count:
        assert time.monotonic() < deadline, "".join(server.lines)
        line = server.proc.stderr.readline()
        assert line, "server exited:\n" + "".join(server.lines)
        server.lines.append(line)
    return matches


def test_workers_share_listeners_and_metrics_and_restart(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, "--workers", "2", "--Smtp:RequireAuthentication=false")
    try:
        server.wait_listening({"submission", "health"})
        started = wait_for_log(server, WORKER_STARTED, 2)
        pids = {int(WORKER_STARTED.search(line).group(2)) for line in started}  # type: ignore[union-attr]
        assert len(pids) == 2

        submission, health = server.ports["submission"], server.ports["health"]
        send(submission, 6, "before")
        assert metric(health, "smtp_messages_received_total") == 6

        os.kill(min(pids), signal.SIGKILL)
        restarted = wait_for_log(server, WORKER_STARTED, 3)[-1]
        new_pid = int(WORKER_STARTED.search(restarted).group(2))  # type: ignore[union-attr]
        assert new_pid not in pids

        send(submission, 4, "after")
        assert metric(health, "smtp_messages_received_total") >= 10
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = "".join(server.lines)
    assert "Traceback" not in log
    assert len(run_cli(tmp_path, "mail", "list").stdout.splitlines()) == 10


def test_workers_serve_one_development_certificate(tmp_path: Path) -> None:
    import hashlib
    import socket
    import ssl

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        secure_port = sock.getsockname()[1]
    server = ServeProcess(
        tmp_path, "--workers", "2", "--dev-tls", f"--Smtp:SecurePort={secure_port}"
    )
    try:
        server.wait_listening({"submission-tls", "health"})
        wait_for_log(server, WORKER_STARTED, 2)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # self-signed development certificate
        seen = set()
        for _ in range(8):  # enough connections to reach both workers
            with smtplib.SMTP_SSL("127.0.0.1", secure_port, timeout=10, context=context) as smtp:
                assert isinstance(smtp.sock, ssl.SSLSocket)
                der = smtp.sock.getpeercert(binary_form=True)
                assert der is not None
                seen.add(hashlib.sha1(der).hexdigest())
        assert len(seen) == 1
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
