"""Reading a certificate and its key from what an operator configured (SPEC §2, §10).

The formats the original C# host accepted (PFX/PKCS#12 with a password, DER) plus PEM,
told apart by content. Every failure becomes one :class:`CertificateError` whose message
names the problem, so start-up can stop with ``Smtp:CertificatePath: <message>``
instead of a traceback.
"""

from __future__ import annotations

import datetime
import re
from typing import Final

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
# Key types that can sign a TLS handshake; anything else (DSA, X25519, DH) cannot serve.
_SIGNING_KEY_TYPES: Final = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_PEM_KEY_LABELS: Final = frozenset(
    {b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
)


class CertificateError(Exception):
    """The configured certificate or key cannot be used; the message says why."""


@attrs.frozen(kw_only=True)
class CertificateInfo:
    """What the health check and the logs report about the certificate being served."""

    subject: str
    """RFC 4514 form, most specific first (``CN=mail.example.com,O=Example``)."""
    issuer: str
    serial_number: int
    not_before: datetime.datetime
    """Aware, UTC."""
    not_after: datetime.datetime
    """Aware, UTC."""
    thumbprint: str
    """SHA-1 of the DER encoding in upper-case hex, as .NET's X509Certificate2.Thumbprint."""

    @classmethod
    def from_x509(cls, cert: x509.Certificate) -> CertificateInfo:
        """Describe ``cert``."""
        return cls(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial_number=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            # SHA-1 names the certificate here (as .NET does); it secures nothing.
            thumbprint=cert.fingerprint(hashes.SHA1()).hex().upper(),
        )


@attrs.frozen(kw_only=True)
class LoadedCertificate:
    """A certificate chain and its private key, normalised to PEM, plus a description.

    PEM is what ``ssl.SSLContext.load_cert_chain`` reads, whatever the source format
    was. The key is kept out of ``repr`` so that it never reaches a log line.
    """

    chain_pem: bytes
    """Leaf first, then the certificates that lead towards a root."""
    key_pem: bytes = attrs.field(repr=False)
    """Unencrypted PKCS#8."""
    info: CertificateInfo


def load_certificate(
    path: str, *, password: str | None = None, key_path: str | None = None
) -> LoadedCertificate:
    """Read a certificate (and its key) in whichever format the file is in.

    Accepted, told apart by content rather than file extension:

    * PEM: certificates (leaf, then intermediates) with the key in the same file or in
      ``key_path``. An encrypted PEM key is opened with ``password``.
    * PKCS#12/PFX: as exported by Windows and .NET, with ``password`` (none or empty
      is tried for password-less files). Its own key is used unless ``key_path`` is set.
    * DER: a single certificate; the key must come from ``key_path``.

    When ``key_path`` is given it names the key explicitly and wins over a key inside
    the certificate file. The leaf is the certificate that matches the key, so chain
    order in the file does not matter beyond that.

    Raises:
        CertificateError: the file is missing, unreadable, in no known format,
            has a wrong password, lacks a key, or the key does not match.
    """
    if password == "":
        password = None  # an empty setting (Smtp__CertificatePassword=) means "none"
    data = _read_file(path, "certificate file")
    file_key: _PrivateKey | None
    if b"-----BEGIN " in data:
        certs, file_key = _parse_pem(data, path=path, password=password)
        if not certs:
            raise CertificateError(f"{path}: PEM file contains no CERTIFICATE block")
    elif _looks_like_pkcs12(data):
        certs, file_key = _parse_pkcs12(data, path=path, password=password)
    else:
        try:
            certs, file_key = [x509.load_der_x509_certificate(data)], None
        except ValueError:
            raise CertificateError(f"{path}: not a PEM, DER or PKCS#12 (PFX) certificate") from None

    if key_path:
        key = _load_key_file(key_path, password=password)
    elif file_key is not None:
        key = file_key
    else:
        raise CertificateError(
            f"{path}: the certificate file holds no private key; "
            "name one with Smtp:CertificateKeyPath"
        )

    leaf = _matching_certificate(certs, key)
    if leaf is None:
        where = key_path if key_path else path
        raise CertificateError(f"{path}: the private key in {where} does not match the certificate")
    chain = _order_chain(leaf, [c for c in certs if c is not leaf])
    return LoadedCertificate(
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        info=CertificateInfo.from_x509(leaf),
    )


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise CertificateError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise CertificateError(f"{what} {path} is empty")
    return data


def _looks_like_pkcs12(data: bytes) -> bool:
    """Tell a PFX from a DER certificate by their first ASN.1 element.

    Both are a DER SEQUENCE, but a PFX starts with ``version INTEGER (3)`` (RFC 7292 §4)
    while a certificate starts with the ``tbsCertificate`` SEQUENCE (RFC 5280 §4.1).
    Knowing it is a PFX lets a failed decrypt be reported as a password problem.
    """
    if len(data) < 2 or data[0] != 0x30:
        return False
    first_length_byte = data[1]
    # Short form (< 0x80): length in this byte. Long form: 0x80 | number of length bytes.
    # 0x80 alone is BER's indefinite length, which old Windows exports use.
    header = 2 if first_length_byte < 0x80 else 2 + (first_length_byte & 0x7F)
    return data[header : header + 3] == b"\x02\x01\x03"


def _parse_pkcs12(
    data: bytes, *, path: str, password: str | None
) -> tuple[list[x509.Certificate], _PrivateKey | None]:
    # A password-less PFX may be protected by "no password" or by the empty password,
    # depending on the tool that wrote it; .NET opens both, so try both.
    candidates: list[bytes | None] = [None, b""] if password is None else [password.encode()]
    for candidate in candidates:
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, candidate)
        except ValueError:
            continue
        break
    else:
        if password is None:
            raise CertificateError(
                f"{path}: the PKCS#12 (PFX) file needs a password; set Smtp:CertificatePassword"
            )
        raise CertificateError(
            f"{path}: wrong password for the PKCS#12 (PFX) file (Smtp:CertificatePassword), "
            "or the file is damaged"
        )
    certs = ([cert] if cert is not None else []) + list(extra)
    if not certs:
        raise CertificateError(f"{path}: the PKCS#12 (PFX) file contains no certificate")
    return certs, _signing_key(key, path) if key is not None else None


def _parse_pem(
    data: bytes, *, path: str, password: str | None
) -> tuple[list[x509.Certificate], _PrivateKey | None]:
    certs: list[x509.Certificate] = []
    key: _PrivateKey | None = None
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1)
        if label in (b"CERTIFICATE", b"X509 CERTIFICATE"):
            try:
                certs.append(x509.load_pem_x509_certificate(match.group(0)))
            except ValueError as exc:
                raise CertificateError(f"{path}: damaged CERTIFICATE block: {exc}") from None
        elif label in _PEM_KEY_LABELS and key is None:
            key = _parse_pem_key(match.group(0), path=path, password=password)
    return certs, key


def _load_key_file(key_path: str, *, password: str | None) -> _PrivateKey:
    data = _read_file(key_path, "key file (Smtp:CertificateKeyPath)")
    if b"-----BEGIN " in data:
        for match in _PEM_BLOCK.finditer(data):
            if match.group(1) in _PEM_KEY_LABELS:
                return _parse_pem_key(match.group(0), path=key_path, password=password)
        raise CertificateError(f"{key_path}: no PRIVATE KEY block in the key file")
    try:
        loaded = serialization.load_der_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"{key_path}: not a PEM or DER private key") from None
    return _signing_key(loaded, key_path)


def _parse_pem_key(block: bytes, *, path: str, password: str | None) -> _PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(block, None)
    except TypeError:  # encrypted: cryptography says so by TypeError, not ValueError
        if password is None:
            raise CertificateError(
                f"{path}: the private key is encrypted; set Smtp:CertificatePassword"
            ) from None
        try:
            loaded = serialization.load_pem_private_key(block, password.encode())
        except (ValueError, TypeError):
            raise CertificateError(
                f"{path}: wrong password for the encrypted private key (Smtp:CertificatePassword)"
            ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{path}: damaged or unsupported private key: {exc}") from None
    return _signing_key(loaded, path)


def _signing_key(key: object, path: str) -> _PrivateKey:
    if not isinstance(key, _SIGNING_KEY_TYPES):
        raise CertificateError(
            f"{path}: a {type(key).__name__} cannot sign TLS handshakes; "
            "use an RSA, EC or Ed25519 key"
        )
    return key


def _matching_certificate(
    certs: list[x509.Certificate], key: _PrivateKey
) -> x509.Certificate | None:
    wanted = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for cert in certs:
        if (
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == wanted
        ):
            return cert
    return None


def _order_chain(leaf: x509.Certificate, others: list[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf, then its issuer, its issuer's issuer…, then anything left in file order.

    TLS 1.2 (RFC 5246 §7.4.2) wants the chain in this order and PFX files do not keep
    one; leftovers are still sent rather than silently dropped, as OpenSSL would.
    """
    chain = [leaf]
    remaining = list(others)
    current = leaf
    while current.issuer != current.subject:
        issuer = next((c for c in remaining if c.subject == current.issuer), None)
        if issuer is None:
            break
        chain.append(issuer)
        remaining.remove(issuer)
        current = issuer
    return chain + remaining
