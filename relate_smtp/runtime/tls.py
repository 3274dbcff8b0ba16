"""TLS for the SMTP listeners: certificate loading, server contexts, reload, health data.

This module owns everything between "an operator named a certificate file" and "a
session has an ``ssl.SSLContext`` to hand to ``trio.SSLStream``":

* :func:`load_certificate` reads the formats the original C# host accepted (PFX/PKCS#12
  with a password, DER) plus PEM (SPEC §2, §10), and turns every failure into one
  :class:`CertificateError` whose message names the problem, so start-up can stop with
  ``Smtp:CertificatePath: <message>`` instead of a traceback.
* :func:`server_context` builds the server-side context; :func:`wrap_server` is the one
  place that decides how an ``SSLStream`` is configured.
* :class:`CertificateStore` holds the current context and swaps it on :meth:`reload`
  (SIGHUP, wired by the server) or when :meth:`CertificateStore.watch` sees the files
  change. Each new handshake reads ``store.context``; sessions already encrypted keep
  the ``SSLStream`` they hold, so swapping the reference is the whole reload.
* :func:`generate_dev_certificate` makes the throw-away certificate for
  ``serve --dev-tls``.
* :func:`certificate_status` maps certificate validity onto the ``certificate`` health
  check (SPEC §7) without depending on the health module's types.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import math
import os
import re
import secrets
import ssl
import tempfile
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import attrs
import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from relate_smtp.config import SmtpSettings

__all__ = [
    "HTTPS_COMPATIBLE",
    "CertificateError",
    "CertificateInfo",
    "CertificateSource",
    "CertificateStatus",
    "CertificateStore",
    "HealthStatus",
    "LoadedCertificate",
    "certificate_status",
    "generate_dev_certificate",
    "load_certificate",
    "server_context",
    "wrap_server",
]

logger = logging.getLogger("relate_smtp.tls")

# SMTP frames its own end of conversation: a message is complete only at CRLF.CRLF (or
# the last BDAT chunk) and is acknowledged by a 250, and a session ends with QUIT/221.
# A peer that drops TCP without TLS close_notify therefore cannot truncate anything we
# would act on, which is exactly the reasoning behind HTTPS's tolerance. With this set,
# a missing close_notify reads as a clean EOF (b"") instead of BrokenResourceError, and
# aclose() does not wait to exchange close_notify with clients that never send one.
HTTPS_COMPATIBLE: Final = True

# Health thresholds (SPEC §7): fewer days left than these → Degraded / Unhealthy.
DEGRADED_BELOW: Final = datetime.timedelta(days=30)
UNHEALTHY_BELOW: Final = datetime.timedelta(days=7)

DEV_CERTIFICATE_DAYS: Final = 30

HealthStatus = Literal["Healthy", "Degraded", "Unhealthy"]

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

_T_Stream = TypeVar("_T_Stream", bound=trio.abc.Stream)


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


@attrs.frozen(kw_only=True)
class CertificateStatus:
    """The ``certificate`` health check's verdict, in the health JSON's vocabulary."""

    status: HealthStatus
    description: str
    data: Mapping[str, str | float] | None = attrs.field(default=None, hash=False)
    """``subject``, ``notBefore``, ``notAfter``, ``daysUntilExpiry``, ``thumbprint``."""


# --------------------------------------------------------------------------- loading


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


# --------------------------------------------------------------------------- contexts


def server_context(cert: LoadedCertificate) -> ssl.SSLContext:
    """Build a server-side context serving ``cert``.

    Python's defaults for ``Purpose.CLIENT_AUTH`` (OpenSSL's secure cipher list, no
    compression, server cipher preference) with TLS 1.2 as the floor, no client
    certificate requested, and client-initiated renegotiation refused (a cheap CPU
    exhaustion vector with nothing to gain for SMTP).

    ``ssl`` can only load a certificate and key from files. They are written to a fresh
    ``tempfile`` directory (mode 0700), in a file created 0600, and removed as soon as
    OpenSSL has read them; on top of that the key is written encrypted under a random
    one-time password, so the plain key never touches the disk even briefly.

    Raises:
        CertificateError: OpenSSL refused the certificate or key.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    one_time_password = secrets.token_bytes(32)
    key = serialization.load_pem_private_key(cert.key_pem, None)
    encrypted_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(one_time_password),
    )
    with tempfile.TemporaryDirectory(prefix="relate-smtp-tls-") as directory:
        bundle = os.path.join(directory, "bundle.pem")
        fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(encrypted_key + cert.chain_pem)
        try:
            ctx.load_cert_chain(bundle, password=one_time_password)
        except ssl.SSLError as exc:
            raise CertificateError(f"the TLS library refused the certificate: {exc}") from None
    return ctx


def wrap_server(stream: _T_Stream, ctx: ssl.SSLContext) -> trio.SSLStream[_T_Stream]:
    """Wrap an accepted connection for the server side of a TLS handshake.

    The caller runs ``await ssl_stream.do_handshake()`` under its handshake timeout.
    See :data:`HTTPS_COMPATIBLE` for how the end of the stream behaves.
    """
    return trio.SSLStream(stream, ctx, server_side=True, https_compatible=HTTPS_COMPATIBLE)


# --------------------------------------------------------------------------- reloading


@attrs.frozen(kw_only=True)
class CertificateSource:
    """Where a certificate is re-read from: the three ``Smtp:Certificate*`` settings."""

    path: str
    password: str | None = attrs.field(default=None, repr=False)
    key_path: str | None = None

    def paths(self) -> tuple[str, ...]:
        return (self.path, self.key_path) if self.key_path else (self.path,)


# What identifies a version of the files: (device, inode, size, mtime) each, or None
# while a file is missing. A replaced file (rename, Kubernetes' symlink swap) gets a new
# inode; an edit in place changes size or mtime.
_Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


def _fingerprint(paths: tuple[str, ...]) -> _Fingerprint:
    result: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result.append(None)
        else:
            result.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(result)


@attrs.frozen
class _Current:
    certificate: LoadedCertificate
    context: ssl.SSLContext
    generation: int


class CertificateStore:
    """The certificate being served, replaceable while the server runs.

    Readers take ``store.context`` at each handshake. The current certificate, context
    and generation live in one immutable record swapped in a single assignment, so a
    reader never sees a context from one load and info from another, and :meth:`reload`
    may run in a worker thread. A failed reload keeps the old record: a bad file on disk
    must not take TLS down on a running server.
    """

    def __init__(
        self,
        certificate: LoadedCertificate,
        context: ssl.SSLContext,
        *,
        source: CertificateSource | None = None,
        fingerprint: _Fingerprint = (),
    ) -> None:
        """Hold an already loaded certificate; see :meth:`from_files` and :meth:`from_settings`."""
        self._source = source
        self._current = _Current(certificate, context, 0)
        self._lock = threading.Lock()
        self._attempted: _Fingerprint = fingerprint
        self._last_error: str | None = None

    @classmethod
    def from_files(
        cls, path: str, *, password: str | None = None, key_path: str | None = None
    ) -> CertificateStore:
        """Load ``path`` (see :func:`load_certificate`) and build its context.

        Raises:
            CertificateError: as :func:`load_certificate` and :func:`server_context`.
        """
        source = CertificateSource(path=path, password=password, key_path=key_path)
        fingerprint = _fingerprint(source.paths())
        certificate = load_certificate(path, password=password, key_path=key_path)
        store = cls(
            certificate, server_context(certificate), source=source, fingerprint=fingerprint
        )
        _warn_if_not_current(certificate.info, path)
        return store

    @classmethod
    def from_settings(cls, smtp: SmtpSettings) -> CertificateStore | None:
        """The store for ``Smtp:Certificate*``, or None when no certificate is configured."""
        if not smtp.certificate_path:
            return None
        return cls.from_files(
            smtp.certificate_path,
            password=smtp.certificate_password,
            key_path=smtp.certificate_key_path,
        )

    @classmethod
    def from_loaded(cls, certificate: LoadedCertificate) -> CertificateStore:
        """A store for a certificate with no file behind it (``--dev-tls``); never reloads."""
        return cls(certificate, server_context(certificate))

    @property
    def context(self) -> ssl.SSLContext:
        """The context for new handshakes."""
        return self._current.context

    @property
    def info(self) -> CertificateInfo:
        """The certificate new handshakes present."""
        return self._current.certificate.info

    @property
    def certificate(self) -> LoadedCertificate:
        return self._current.certificate

    @property
    def generation(self) -> int:
        """Counts successful reloads; lets callers and tests notice a swap."""
        return self._current.generation

    @property
    def last_error(self) -> str | None:
        """Why the last reload failed, until one succeeds; the health check reports it."""
        return self._last_error

    @property
    def path(self) -> str | None:
        return self._source.path if self._source else None

    def status(self, now: datetime.datetime) -> CertificateStatus:
        """The ``certificate`` health check for what this store serves."""
        return certificate_status(self.info, now, error=self._last_error)

    def reload(self) -> bool:
        """Re-read the files; True if the new certificate is now served.

        On failure the current certificate stays in service, the error is logged and
        kept in :attr:`last_error`, and False is returned. Safe to call from a worker
        thread and concurrently with itself.
        """
        source = self._source
        if source is None:
            return False
        with self._lock:
            # Stat before reading: if the files change while we read, the next poll
            # sees a fingerprint we have not tried yet and loads again.
            self._attempted = _fingerprint(source.paths())
            try:
                certificate = load_certificate(
                    source.path, password=source.password, key_path=source.key_path
                )
                context = server_context(certificate)
            except CertificateError as exc:
                self._last_error = str(exc)
                logger.error(
                    "Could not reload the TLS certificate (Smtp:CertificatePath): %s; "
                    "still serving %s (thumbprint %s)",
                    exc,
                    self.info.subject,
                    self.info.thumbprint,
                )
                return False
            previous = self._current
            self._current = _Current(certificate, context, previous.generation + 1)
            self._last_error = None
        info = certificate.info
        logger.info(
            "Reloaded TLS certificate from %s: %s (thumbprint %s, valid until %s)%s",
            source.path,
            info.subject,
            info.thumbprint,
            info.not_after.isoformat(),
            " (unchanged)" if info == previous.certificate.info else "",
        )
        _warn_if_not_current(info, source.path)
        return True

    async def watch(self, *, interval: float = 5.0) -> None:
        """Reload whenever the certificate or key file changes; runs until cancelled.

        Polls ``os.stat`` every ``interval`` seconds: portable, cheap, and it also sees
        Kubernetes' symlink swaps, which inotify-style watches miss. A change is acted
        on once it has been stable for one interval, so a certificate and key written
        one after the other are loaded together rather than failing as a mismatched
        pair in between. A failed reload is not retried until the files change again,
        so a broken file is logged once, not every interval. Returns at once for a
        store with no files.
        """
        source = self._source
        if source is None:
            await trio.lowlevel.checkpoint()
            return
        paths = source.paths()
        pending: _Fingerprint | None = None
        while True:
            await trio.sleep(interval)
            seen = _fingerprint(paths)
            if seen == self._attempted:
                pending = None
            elif seen != pending:
                pending = seen  # changed since the last poll: let it settle
            else:
                pending = None
                await trio.to_thread.run_sync(self.reload)


def _warn_if_not_current(info: CertificateInfo, path: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if info.not_after <= now:
        logger.warning(
            "TLS certificate %s (%s) expired on %s; clients will refuse it",
            path,
            info.subject,
            info.not_after.isoformat(),
        )
    elif info.not_before > now:
        logger.warning(
            "TLS certificate %s (%s) is not valid before %s; clients will refuse it",
            path,
            info.subject,
            info.not_before.isoformat(),
        )


# --------------------------------------------------------------------------- dev certificate


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


# --------------------------------------------------------------------------- health


def certificate_status(
    info: CertificateInfo | None,
    now: datetime.datetime,
    *,
    error: str | None = None,
) -> CertificateStatus:
    """Grade a certificate for the ``certificate`` health check (SPEC §7).

    None configured → Healthy. Otherwise by time left until ``not_after``: 30 days or
    more → Healthy, less → Degraded, less than 7 days, expired or not yet valid →
    Unhealthy. ``error`` (the file could not be read on the last reload) → Unhealthy,
    with the data of the certificate still being served when there is one.
    ``daysUntilExpiry`` is fractional days rounded to two places, negative once expired.
    """
    if info is None:
        if error is not None:
            return CertificateStatus(status="Unhealthy", description=error)
        return CertificateStatus(status="Healthy", description="No certificate configured")
    left = info.not_after - now
    data: dict[str, str | float] = {
        "subject": info.subject,
        "notBefore": _iso(info.not_before),
        "notAfter": _iso(info.not_after),
        "daysUntilExpiry": round(left.total_seconds() / 86400, 2),
        "thumbprint": info.thumbprint,
    }
    status: HealthStatus
    if error is not None:
        status, description = "Unhealthy", f"Certificate file unreadable: {error}"
    elif left <= datetime.timedelta(0):
        status, description = "Unhealthy", f"Certificate expired on {_iso(info.not_after)}"
    elif now < info.not_before:
        status, description = "Unhealthy", f"Certificate not valid before {_iso(info.not_before)}"
    else:
        days = math.floor(left / datetime.timedelta(days=1))
        summary = f"Certificate expires in {days} days ({_iso(info.not_after)})"
        if left < UNHEALTHY_BELOW:
            status = "Unhealthy"
        elif left < DEGRADED_BELOW:
            status = "Degraded"
        else:
            status = "Healthy"
        description = summary
    return CertificateStatus(status=status, description=description, data=data)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
