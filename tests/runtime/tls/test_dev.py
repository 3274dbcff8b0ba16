"""The development certificate: a working handshake, short-lived, named for the host."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from relate_smtp.runtime.tls import CertificateStore, generate_dev_certificate, server_context
from tests.runtime.tls.helpers import UTC, handshake


@pytest.mark.parametrize("server_hostname", ["mx.dev.test", "localhost", "127.0.0.1"])
async def test_dev_certificate_handshake(server_hostname: str) -> None:
    dev = generate_dev_certificate("mx.dev.test")

    peer = await handshake(server_context(dev), dev.chain_pem, hostname=server_hostname)

    assert peer.serial_number == dev.info.serial_number


def test_dev_certificate_is_short_lived_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = datetime.datetime.now(UTC)

    dev = generate_dev_certificate("mx.dev.test")
    CertificateStore.from_loaded(dev)

    assert "CN=mx.dev.test" in dev.info.subject
    lifetime = dev.info.not_after - before
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30, minutes=1)
    assert dev.info.not_before < before
    assert list(tmp_path.iterdir()) == []


def test_dev_certificate_accepts_a_long_hostname() -> None:
    name = ("a" * 60 + ".") * 3 + "test"

    dev = generate_dev_certificate(name)

    cert = x509.load_pem_x509_certificate(dev.chain_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert name in san.get_values_for_type(x509.DNSName)
