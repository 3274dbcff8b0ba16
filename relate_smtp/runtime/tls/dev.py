"""The throw-away certificate of ``serve --dev-tls``."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relate_smtp.runtime.tls.certificates import CertificateInfo, LoadedCertificate

DEV_CERTIFICATE_DAYS: Final = 30


def generate_dev_certificate(
    hostname: str, *, valid_days: int = DEV_CERTIFICATE_DAYS
) -> LoadedCertificate:
    """A self-signed certificate for ``serve --dev-tls``, held in memory only.

    EC P-256 (fast to generate, accepted by every current TLS client). Names: ``hostname``
    plus ``localhost`` and ``127.0.0.1``/``::1`` so local tools can verify it when told
    to trust it. Valid from an hour ago (clock skew) for ``valid_days``. Nothing is
    written to the working directory.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for name in (hostname, "localhost", "127.0.0.1", "::1"):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name.lower())
        if general not in names:
            names.append(general)
    # X.520 caps commonName at 64 characters; the SAN carries the real name anyway.
    common_name = hostname if 0 < len(hostname) <= 64 else "relate-smtp development"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "relate-smtp development certificate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate(
        chain_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        info=CertificateInfo.from_x509(cert),
    )
