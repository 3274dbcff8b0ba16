"""The ``serve`` command: open the store and certificates, run the server, handle signals."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from datetime import UTC, datetime

import trio

from relate_smtp.config import Settings
from relate_smtp.runtime import tls
from relate_smtp.runtime.server import Server, StartupError
from relate_smtp.storage import SchemaMissing
from relate_smtp.storage.opening import open_store

log = logging.getLogger("relate_smtp")

EXIT_STARTUP = 2


def load_certificates(settings: Settings, *, dev_tls: bool) -> tls.CertificateStore | None:
    """The certificate holder for these settings; errors name the key at fault."""
    smtp = settings.smtp
    if smtp.certificate_path:
        try:
            return tls.CertificateStore.from_files(
                smtp.certificate_path,
                password=smtp.certificate_password,
                key_path=smtp.certificate_key_path,
            )
        except tls.CertificateError as exc:
            raise StartupError("Smtp:CertificatePath", str(exc)) from None
    if dev_tls:
        log.warning("--dev-tls: using an ephemeral self-signed certificate (development only)")
        return tls.CertificateStore.from_loaded(tls.generate_dev_certificate(smtp.server_name))
    return None


async def serve_until_signalled(settings: Settings, *, dev_tls: bool) -> None:
    certificates = load_certificates(settings, dev_tls=dev_tls)
    async with open_store(settings) as store:
        server = Server(
            settings,
            store=store,
            tls_context=(lambda: certificates.context) if certificates else (lambda: None),
            certificate_health=(
                (lambda: certificates.status(datetime.now(UTC))) if certificates else None
            ),
        )
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

                async def watch_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            if certificates is not None:
                                await trio.to_thread.run_sync(certificates.reload)
                            continue
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        server.shutdown()

                nursery.start_soon(watch_signals)
                if certificates is not None and certificates.path is not None:
                    nursery.start_soon(certificates.watch)
                await server.serve()
                nursery.cancel_scope.cancel()


def run_server(settings: Settings, *, dev_tls: bool = False) -> int:
    try:
        trio.run(functools.partial(serve_until_signalled, settings, dev_tls=dev_tls))
    except BaseExceptionGroup as group:
        startup = _find(group, (StartupError, SchemaMissing))
        if startup is None:
            raise
        return _report(startup)
    except (StartupError, SchemaMissing) as exc:
        return _report(exc)
    return 0


def _report(exc: BaseException) -> int:
    print(f"relate-smtp: cannot start: {exc}", file=sys.stderr)
    return EXIT_STARTUP


def _find(
    group: BaseExceptionGroup[BaseException], types: tuple[type[BaseException], ...]
) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, types):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _find(exc, types)
            if found is not None:
                return found
    return None
