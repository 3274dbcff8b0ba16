"""Certificates for the TLS tests: issued by a test CA, written as PFX or PEM, and an
in-memory handshake that checks what a client is served."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

import attrs
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from relate_smtp.runtime.tls import wrap_server

HOST = "mail.example.test"
UTC = datetime.UTC


@attrs.frozen
class Leaf:
    """A certificate issued by a test CA, as cryptography objects."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: tuple[x509.Certificate, ...]

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.intermediates)
        )


def issue(
    ca: trustme.CA,
    name: str = HOST,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Leaf:
    leaf = ca.issue_cert(name, not_before=not_before, not_after=not_after)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    certs = [x509.load_pem_x509_certificate(blob.bytes()) for blob in leaf.cert_chain_pems]
    return Leaf(cert=certs[0], key=key, intermediates=tuple(certs[1:]))


def write_pfx(path: Path, leaf: Leaf, password: bytes | None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"friendly", leaf.key, leaf.cert, list(leaf.intermediates) or None, encryption
        )
    )
    return path


def write_pem(path: Path, leaf: Leaf) -> Path:
    path.write_bytes(leaf.chain_pem() + leaf.key_pem())
    return path


def replace_file(path: Path, content: bytes) -> None:
    """Swap in new content atomically, as deployment tools do (new inode)."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(content)
    os.replace(staging, path)


def pem_count(chain_pem: bytes) -> int:
    return chain_pem.count(b"-----BEGIN CERTIFICATE-----")


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        data += chunk
    return data


async def handshake(
    server_ctx: ssl.SSLContext, trusted_pem: bytes, hostname: str = HOST
) -> x509.Certificate:
    """Run a verified in-memory handshake, exchange a line each way, return the peer cert."""
    client_ctx = ssl.create_default_context(cadata=trusted_pem.decode())
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = wrap_server(server_transport, server_ctx)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=hostname)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        await client.send_all(b"EHLO client.example\r\n")
        assert await receive_exactly(server, 21) == b"EHLO client.example\r\n"
        await server.send_all(b"250 ok\r\n")
        assert await receive_exactly(client, 8) == b"250 ok\r\n"
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
