"""The MX scenarios' sender domain: its SPF, DMARC and DKIM records, and the signer.

The generator sends as ``bench@sender.example`` (MAIL FROM and From) from 127.0.0.1,
which the domain's SPF record authorises; its DMARC record asks for ``p=reject``; every
message carries an rsa-sha256 DKIM signature of the domain (made once: the generator
sends the same bytes each time). With ``Smtp:Mx:SenderAuthentication:Mode=observe``
the server really runs SPF, DKIM and DMARC for each message, against the records that
``python -m bench.dns_server`` serves on loopback.
"""

from __future__ import annotations

import base64
import functools

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SENDER_DOMAIN = "sender.example"
SENDER = f"bench@{SENDER_DOMAIN}"
HOSTED_DOMAIN = "hosted.example"
RECIPIENT = f"bench-rcpt@{HOSTED_DOMAIN}"
SELECTOR = "bench"


@functools.cache
def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def records() -> list[tuple[str, str]]:
    """(name, TXT text) of every record the sender domain publishes."""
    der = (
        _private_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return [
        (SENDER_DOMAIN, "v=spf1 ip4:127.0.0.1 -all"),
        (f"_dmarc.{SENDER_DOMAIN}", "v=DMARC1; p=reject"),
        (
            f"{SELECTOR}._domainkey.{SENDER_DOMAIN}",
            "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode(),
        ),
    ]


def sign(message: bytes) -> bytes:
    """``message`` with a DKIM-Signature of the sender domain prepended (dkimpy)."""
    pem = _private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    header = dkim.sign(
        message,
        SELECTOR.encode(),
        SENDER_DOMAIN.encode(),
        pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(header) + message
