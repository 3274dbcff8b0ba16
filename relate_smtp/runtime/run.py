"""The ``serve`` command: open the store and certificates, run the server, handle signals."""

from __future__ import annotations

import functools
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

import trio

from relate_smtp.config import Settings
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.runtime import tls
from relate_smtp.runtime.listeners import StartupError
from relate_smtp.runtime.server import Server
from relate_smtp.storage import AdminStore, SchemaMissing, StoreUnavailable
from relate_smtp.storage.opening import StoreOpenError, open_store

log = logging.getLogger("relate_smtp")

EXIT_STARTUP = 2


def load_certificates(settings: Settings, *, dev_tls: bool) -> tls.CertificateStore | None:
    """The certificate holder for these settings; errors name the key at fault."""
    try:
        configured = tls.CertificateStore.from_settings(settings.smtp)
    except tls.CertificateError as exc:
        raise StartupError("Smtp:CertificatePath", str(exc)) from None
    if configured is None and dev_tls:
        log.warning("--dev-tls: using an ephemeral self-signed certificate (development only)")
        dev = tls.generate_dev_certificate(settings.smtp.server_name)
        return tls.CertificateStore.from_loaded(dev)
    return configured


async def check_store(store: AdminStore) -> None:
    """SPEC §10: a reachable database without the tables stops start-up; an unreachable
    one does not (health reports it and SMTP answers 4xx until it returns)."""
    try:
        await store.check_schema()
    except StoreUnavailable as exc:
        log.warning("database unavailable at start-up, continuing: %s", exc)


async def serve_until_signalled(
    settings: Settings,
    *,
    dev_tls: bool,
    sockets: Mapping[ListenerKind, Sequence[socket.socket]] | None = None,
) -> None:
    """Run one server until SIGTERM/SIGINT; SIGHUP reloads the certificate.

    With ``sockets`` (inherited from a ``--workers`` parent) this process is a worker:
    it serves those sockets and leaves /healthz and /metrics to the parent.
    """
    certificates = load_certificates(settings, dev_tls=dev_tls)
    async with open_store(settings) as store:
        await check_store(store)
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
                await server.serve(sockets=sockets, health=sockets is None)
                nursery.cancel_scope.cancel()


def run_server(
    settings: Settings,
    *,
    dev_tls: bool = False,
    sockets: Mapping[ListenerKind, Sequence[socket.socket]] | None = None,
) -> int:
    return run_reporting_startup_errors(
        functools.partial(serve_until_signalled, settings, dev_tls=dev_tls, sockets=sockets)
    )


def run_reporting_startup_errors(main: Callable[[], Awaitable[None]]) -> int:
    """``trio.run(main)``; a start-up problem becomes one message and exit status 2."""
    try:
        trio.run(main)
    except BaseException as exc:
        startup = find_exception(exc, (StartupError, SchemaMissing, StoreOpenError))
        if startup is None:
            raise
        return report_startup_error(startup)
    return 0


def report_startup_error(exc: BaseException) -> int:
    print(f"relate-smtp: cannot start: {exc}", file=sys.stderr)
    return EXIT_STARTUP


def find_exception(
    exc: BaseException, types: tuple[type[BaseException], ...]
) -> BaseException | None:
    """``exc`` itself or the first exception of ``types`` inside its (nested) groups:
    nurseries and the asyncio bridge wrap what a task raised."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, types)
            if found is not None:
                return found
    return None
