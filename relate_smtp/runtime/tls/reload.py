"""The certificate being served, swapped on SIGHUP or when its files change.

Each new handshake reads ``store.context``; sessions already encrypted keep the
``SSLStream`` they hold, so swapping the reference is the whole reload.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
from typing import TYPE_CHECKING

import attrs
import trio

from relate_smtp.runtime.tls.certificates import (
    CertificateError,
    CertificateInfo,
    LoadedCertificate,
    load_certificate,
)
from relate_smtp.runtime.tls.contexts import server_context
from relate_smtp.runtime.tls.status import CertificateStatus, certificate_status

if TYPE_CHECKING:
    from relate_smtp.config import SmtpSettings

logger = logging.getLogger("relate_smtp.tls")


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
