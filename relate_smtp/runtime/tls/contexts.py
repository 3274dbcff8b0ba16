"""The server-side ``ssl.SSLContext`` for a certificate, and the one place that decides
how an accepted stream is wrapped for TLS."""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from typing import Final, TypeVar

import trio
from cryptography.hazmat.primitives import serialization

from relate_smtp.runtime.tls.certificates import CertificateError, LoadedCertificate

# SMTP frames its own end of conversation: a message is complete only at CRLF.CRLF (or
# the last BDAT chunk) and is acknowledged by a 250, and a session ends with QUIT/221.
# A peer that drops TCP without TLS close_notify therefore cannot truncate anything we
# would act on, which is exactly the reasoning behind HTTPS's tolerance. With this set,
# a missing close_notify reads as a clean EOF (b"") instead of BrokenResourceError, and
# aclose() does not wait to exchange close_notify with clients that never send one.
HTTPS_COMPATIBLE: Final = True

_T_Stream = TypeVar("_T_Stream", bound=trio.abc.Stream)


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
