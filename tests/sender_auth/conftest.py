"""Fixtures: the loopback DNS server, signing keys, and a transaction runner."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable

import attrs
import dkim
import nacl.signing
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relate_smtp.sender_auth import (
    Mode,
    NameServer,
    Resolver,
    SenderAuthenticator,
    SenderAuthSettings,
    Verdict,
)

from .dns_server import DnsServer

#: A 512-bit RSA key: too short for RFC 8301, and too short for cryptography to generate.
RSA_512_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBAM9yt4wa7D2MUDmNFGZt+YPBZStHf3QVr7/5Cwm7H61HHo078TuL
xhbIFOQdIbbuwr/bUoXDCxnyLxO9LAgi8EsCAwEAAQJBAMr+lIFy7u0jWnWWifnZ
b6nwGxGIuz1a40nVZ2m0REEHbay7atI5Enm/u4kfzatvLZaw5ekbE9JwcNS7R6Fl
yXECIQDuDBMVdwX8FPq8VjeUI4r7MD+rpS59YHgmNw/zu6SHRQIhAN8X34NjfPbX
Nz7kF5286wNDo+/G9NWWpn/Mu4qXyopPAiBtj0sdPvmXKsS39+p+mNk3gN5dDppW
BBdoZ0FFSWCRDQIhAN7VpK9DT43rWEZcZG5tRj0jcftNuj4h1TswD1+W0HsnAiAw
BpdO541L9DfYy4LdntmmZfIW+VSwVASbJoyUajolmQ==
-----END RSA PRIVATE KEY-----
"""

AUTHSERV_ID = "mx.relate.test"
#: Addresses of TEST-NET-1 (RFC 5737): only strings here, never contacted.
GOOD_IP = "192.0.2.10"
BAD_IP = "192.0.2.66"


@attrs.frozen
class Key:
    """A DKIM signing key and the TXT record that publishes it."""

    algorithm: bytes
    private: bytes
    record: str


def _rsa_key(private: rsa.RSAPrivateKey, algorithm: bytes = b"rsa-sha256") -> Key:
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(algorithm, pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


@pytest.fixture(scope="session")
def rsa_2048() -> Key:
    return _rsa_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def rsa_512() -> Key:
    private = serialization.load_pem_private_key(RSA_512_PEM, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    return _rsa_key(private)


@pytest.fixture(scope="session")
def ed25519() -> Key:
    seed = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(seed.verify_key)).decode()
    return Key(
        b"ed25519-sha256",
        base64.b64encode(bytes(seed)),
        "v=DKIM1; k=ed25519; p=" + public,
    )


def message(from_header: str, *, body: str = "Hello.\r\n", subject: str = "Test") -> bytes:
    return (
        f"From: {from_header}\r\nTo: user@relate.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <1@test>\r\n\r\n{body}"
    ).encode()


def sign(
    raw: bytes,
    key: Key,
    *,
    domain: str,
    selector: str = "s1",
    algorithm: bytes | None = None,
) -> bytes:
    """Prepend a DKIM-Signature made by dkimpy."""
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=algorithm or key.algorithm,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return bytes(header) + raw


def publish(server: DnsServer, key: Key, *, domain: str, selector: str = "s1") -> None:
    server.txt(f"{selector}._domainkey.{domain}", key.record)


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = DnsServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


Factory = Callable[..., SenderAuthenticator]


@pytest.fixture
def authenticator(dns_server: DnsServer) -> Factory:
    """``authenticator(mode=..., reject_spf_fail=..., random=..., timeout=...)``."""

    def make(
        mode: Mode = Mode.ENFORCE,
        *,
        reject_spf_fail: bool = False,
        random: Callable[[], float] = lambda: 0.5,
        timeout: float = 2.0,
    ) -> SenderAuthenticator:
        server = NameServer(address="127.0.0.1", port=dns_server.port)
        settings = SenderAuthSettings(
            mode=mode,
            dns_servers=(server,),
            dns_timeout_seconds=timeout,
            reject_spf_fail=reject_spf_fail,
        )
        resolver = Resolver.create(settings.dns_servers, timeout=timeout)
        return SenderAuthenticator(
            settings, authserv_id=AUTHSERV_ID, resolver=resolver, random=random
        )

    return make


async def transaction(
    auth: SenderAuthenticator,
    raw: bytes,
    *,
    mail_from: str,
    client_ip: str = GOOD_IP,
    helo: str = "mail.sender.example",
) -> Verdict:
    """One transaction as the session drives it: begin, From seen, verdict."""
    async with trio.open_nursery() as nursery:
        check = auth.begin(nursery, client_ip=client_ip, helo=helo, mail_from=mail_from)
        for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"from:"):
                check.from_header_seen(line[5:].decode())
        return await check.verdict(raw)
