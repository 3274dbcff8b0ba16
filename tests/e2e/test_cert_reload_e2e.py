"""A certificate replaced on disk is served by ``relate-smtp serve`` without a restart."""

from __future__ import annotations

import hashlib
import signal
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import ServeProcess, free_port, peer_thumbprint_implicit, write_certificate

RELOADED = r"Reloaded TLS certificate from "


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.kill()


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls_thumbprint(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=insecure_context())
        assert isinstance(smtp.sock, ssl.SSLSocket)
        der = smtp.sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha1(der).hexdigest().upper()


def start(tmp_path: Path, pem: Path, serve: list[ServeProcess]) -> ServeProcess:
    server = ServeProcess(
        tmp_path,
        "--Storage:SqlitePath=relate.db",
        f"--Smtp:CertificatePath={pem}",
        f"--Smtp:SecurePort={free_port()}",
    )
    serve.append(server)
    server.wait_listening({"submission", "submission-tls"})
    return server


def test_sighup_serves_the_new_certificate_and_keeps_a_bad_one_out(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    pem = tmp_path / "cert.pem"
    first = write_certificate(pem, days=90)
    server = start(tmp_path, pem, serve)
    implicit, submission = server.ports["submission-tls"], server.ports["submission"]
    assert peer_thumbprint_implicit(implicit) == first.info.thumbprint
    assert starttls_thumbprint(submission) == first.info.thumbprint

    open_session = smtplib.SMTP_SSL("127.0.0.1", implicit, timeout=10, context=insecure_context())
    open_session.ehlo("client.example")

    second = write_certificate(pem, days=90)
    assert second.info.thumbprint != first.info.thumbprint
    server.signal(signal.SIGHUP)
    server.wait_for(RELOADED)
    assert peer_thumbprint_implicit(implicit) == second.info.thumbprint
    assert starttls_thumbprint(submission) == second.info.thumbprint
    # A session opened before the reload goes on with its own handshake.
    assert open_session.noop()[0] == 250
    open_session.quit()

    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    server.signal(signal.SIGHUP)
    server.wait_for(r"Could not reload the TLS certificate")
    assert peer_thumbprint_implicit(implicit) == second.info.thumbprint

    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0, server.log
    assert len(server.lines) and "Traceback" not in server.log


def test_file_change_alone_is_picked_up_by_the_watcher(
    tmp_path: Path, serve: list[ServeProcess]
) -> None:
    pem = tmp_path / "cert.pem"
    first = write_certificate(pem, days=90)
    server = start(tmp_path, pem, serve)
    implicit = server.ports["submission-tls"]
    assert peer_thumbprint_implicit(implicit) == first.info.thumbprint

    second = write_certificate(pem, days=90)
    # The watcher polls every 5 s and acts once the files are stable for one poll.
    server.wait_for(RELOADED, timeout=20)
    assert peer_thumbprint_implicit(implicit) == second.info.thumbprint

    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0, server.log
