"""TLS for the SMTP listeners: everything between "an operator named a certificate
file" and "a session has an ``ssl.SSLContext`` to hand to ``trio.SSLStream``".

One module per job:

* :mod:`.certificates` reads PEM, PFX/PKCS#12 and DER into a :class:`LoadedCertificate`;
* :mod:`.contexts` builds the server context and wraps accepted streams;
* :mod:`.reload` holds the served certificate and swaps it on SIGHUP or a file change;
* :mod:`.dev` makes the throw-away certificate of ``serve --dev-tls``;
* :mod:`.status` grades a certificate for the ``certificate`` health check.
"""

from relate_smtp.runtime.tls.certificates import (
    CertificateError,
    CertificateInfo,
    LoadedCertificate,
    load_certificate,
)
from relate_smtp.runtime.tls.contexts import HTTPS_COMPATIBLE, server_context, wrap_server
from relate_smtp.runtime.tls.dev import DEV_CERTIFICATE_DAYS, generate_dev_certificate
from relate_smtp.runtime.tls.reload import CertificateSource, CertificateStore
from relate_smtp.runtime.tls.status import (
    DEGRADED_BELOW,
    UNHEALTHY_BELOW,
    CertificateStatus,
    HealthStatus,
    certificate_status,
)

__all__ = [
    "DEGRADED_BELOW",
    "DEV_CERTIFICATE_DAYS",
    "HTTPS_COMPATIBLE",
    "UNHEALTHY_BELOW",
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
