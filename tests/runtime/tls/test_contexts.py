"""Server TLS contexts and handshakes over them."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from relate_smtp.runtime.tls import (
    HTTPS_COMPATIBLE,
    CertificateError,
    CertificateInfo,
    LoadedCertificate,
    load_certificate,
    server_context,
    wrap_server,
)
from tests.runtime.tls.helpers import HOST, Leaf, handshake, write_pem, write_pfx


def test_server_context_settings(tmp_path: Path, leaf: Leaf) -> None:
    ctx = server_context(load_certificate(str(write_pem(tmp_path / "c.pem", leaf))))

    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_leaves_no_files_behind(
    tmp_path: Path, leaf: Leaf, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_certificate(str(write_pem(tmp_path / "c.pem", leaf)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    server_context(loaded)

    assert list(scratch.iterdir()) == []


def test_server_context_rejects_what_openssl_refuses(leaf: Leaf) -> None:
    # Consistent for cryptography, but the chain is not PEM OpenSSL can read.
    broken = LoadedCertificate(
        chain_pem=b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        key_pem=leaf.key_pem(),
        info=CertificateInfo.from_x509(leaf.cert),
    )

    with pytest.raises(CertificateError, match="TLS library refused"):
        server_context(broken)


async def test_handshake_serves_the_certificate(tmp_path: Path, ca: trustme.CA, leaf: Leaf) -> None:
    ctx = server_context(
        load_certificate(str(write_pfx(tmp_path / "c.pfx", leaf, b"pw")), password="pw")
    )

    peer = await handshake(ctx, ca.cert_pem.bytes())

    assert peer.serial_number == leaf.cert.serial_number


async def test_missing_close_notify_reads_as_end_of_stream(
    tmp_path: Path, ca: trustme.CA, leaf: Leaf
) -> None:
    assert HTTPS_COMPATIBLE
    ctx = server_context(load_certificate(str(write_pem(tmp_path / "c.pem", leaf))))
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = wrap_server(server_transport, ctx)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=HOST)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        await client_transport.aclose()  # TCP goes away, no TLS close_notify

        assert await server.receive_some() == b""
