"""The composition root: ``Settings`` in, a running process out.

Every process that serves SMTP, the single one and each worker of ``--workers``, is
wired here and only here: the certificate store, the handlers (authenticator, mailbox
filter, parser, delivery, notifier), metrics, the /healthz checks, the signals
(SIGTERM/SIGINT stop, SIGHUP reloads the certificate) and how a start-up problem is
reported (one line on stderr, exit status 2). The runtime modules below it receive what
they need and do no wiring of their own; nothing below imports this module.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Final

import trio
from prometheus_client import CollectorRegistry

from relate_smtp import __version__
from relate_smtp.config import Settings
from relate_smtp.handlers.auth import Authenticator
from relate_smtp.handlers.budget import MemoryBudget
from relate_smtp.handlers.delivery import MessageDelivery, NewMailListener
from relate_smtp.handlers.lastused import LastUsedUpdater
from relate_smtp.handlers.notify import Notifier
from relate_smtp.handlers.parsing import MessageParser, WorkerPool
from relate_smtp.handlers.policy import MailboxFilter
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.runtime import checks, tls
from relate_smtp.runtime.limits import ConnectionLimiter
from relate_smtp.runtime.listeners import StartupError
from relate_smtp.runtime.metrics import Metrics, internal_error_count
from relate_smtp.runtime.network_checks import dns_mx_check, smtp_check
from relate_smtp.runtime.sender_checks import SenderChecks
from relate_smtp.runtime.server import Server
from relate_smtp.runtime.services import Services, Timeouts
from relate_smtp.runtime.spool import Spool
from relate_smtp.sender_auth import Mode, SenderAuthenticator
from relate_smtp.storage import AdminStore, SchemaMissing, Store, StoreUnavailable
from relate_smtp.storage.opening import StoreOpenError
from relate_smtp.telemetry import Instruments
from relate_smtp.telemetry.running import TelemetryRun, exported

log = logging.getLogger("relate_smtp")

EXIT_STARTUP: Final = 2
"""A start-up problem (port taken, certificate unreadable, tables missing): the
``--workers`` parent stops instead of restarting a worker that exits with it."""

_STARTUP_ERRORS: Final = (StartupError, SchemaMissing, StoreOpenError)

TlsContext = Callable[[], ssl.SSLContext | None]
CertificateHealth = Callable[[], checks.StatusLike]


# --------------------------------------------------------------------------- certificates


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


def tls_context_of(certificates: tls.CertificateStore | None) -> TlsContext:
    """The context each new handshake reads (None: no TLS), following reloads."""
    if certificates is None:
        return lambda: None
    return lambda: certificates.context


def certificate_verdict(certificates: tls.CertificateStore | None) -> CertificateHealth:
    """The ``certificate`` check's verdict on what is served now, reloads included."""
    if certificates is None:
        return lambda: tls.certificate_status(None, datetime.now(UTC))
    return lambda: certificates.status(datetime.now(UTC))


async def reload_certificates(certificates: tls.CertificateStore | None) -> None:
    """SIGHUP: re-read the files in a thread (a failure keeps the old certificate)."""
    if certificates is not None:
        await trio.to_thread.run_sync(certificates.reload)


# --------------------------------------------------------------------------- health


def store_directory(settings: Settings) -> str:
    """The directory whose disk the disk-space check watches."""
    if settings.default_connection:
        return "."
    return os.path.dirname(os.path.abspath(settings.storage.sqlite_path))


def health_checks(
    settings: Settings,
    store: Store,
    *,
    submission_port: int,
    certificate_health: CertificateHealth,
    registry: CollectorRegistry,
) -> list[checks.HealthCheck]:
    """SPEC §7's checks, in the original's registration order, which is its JSON's.

    ``registry`` holds ``smtp_internal_errors_total`` (the workers' too, under
    ``--workers``): the ``smtp`` check reports bugs caught while serving mail.
    """
    health = settings.health_check
    probe = [
        checks.database_check(store),
        checks.disk_space_check(store_directory(settings)),
        checks.memory_check(),
        checks.connection_pool_check(store),
        smtp_check(
            "127.0.0.1",
            submission_port,
            proxy_local=ListenerKind.SUBMISSION in settings.smtp.proxy_protocol.listeners,
            internal_errors=lambda: internal_error_count(registry),
        ),
    ]
    if health.dns_mx_domain:
        probe.append(dns_mx_check(health.dns_mx_domain))
    probe.append(checks.certificate_check(certificate_health))
    return probe


# --------------------------------------------------------------------------- services


def build_server(
    settings: Settings,
    *,
    store: Store,
    tls_context: TlsContext = lambda: None,
    certificate_health: CertificateHealth | None = None,
    metrics: Metrics | None = None,
    new_mail_listener: NewMailListener | None = None,
    instruments: Instruments | None = None,
) -> Server:
    """A server for ``settings`` with every service it uses; no I/O until it serves.

    ``new_mail_listener`` replaces the notifier as the one told about stored mail (the
    notifier is still built, started and drained). ``instruments``: the OpenTelemetry
    ones, while exporting (:func:`open_telemetry`).
    """
    smtp = settings.smtp
    metrics = metrics or Metrics(instruments=instruments)
    notifier = Notifier(
        settings.api.base_url, settings.internal_api_key, timeout=settings.api.timeout_seconds
    )
    budget = MemoryBudget(smtp.max_buffered_bytes, on_change=metrics.buffer_changed)
    metrics.safely(lambda: metrics.buffer_budget.set(smtp.max_buffered_bytes))
    spool = Spool(settings.storage.spool_path, threshold=smtp.spool_threshold_bytes)
    last_used = LastUsedUpdater(store)
    # One set of worker processes for large messages: parsing and DKIM share the limit.
    workers = WorkerPool(smtp.mime.parse)
    services = Services(
        store=store,
        authenticator=Authenticator(
            store,
            settings.security,
            last_used=last_used,
            ipv6_prefix_length=smtp.client_ipv6_prefix_length,
        ),
        mailbox_filter=MailboxFilter(
            store=store,
            mx_enabled=smtp.mx.enabled,
            hosted_domains=frozenset(smtp.mx.hosted_domains),
            validate_recipients=smtp.mx.validate_recipients,
            restrict_sender_to_login=smtp.restrict_sender_to_login,
        ),
        delivery=MessageDelivery(
            store,
            budget=budget,
            parser=MessageParser(
                max_attachment_size=smtp.max_attachment_size_bytes,
                mime_limits=smtp.mime.limits,
                workers=workers,
            ),
            discard=settings.storage.discard_messages,
            listener=new_mail_listener or notifier,
        ),
        metrics=metrics,
        timeouts=Timeouts(
            command=smtp.command_timeout_seconds,
            data=smtp.data_timeout_seconds,
            min_data_rate=smtp.min_data_rate_bytes_per_second,
            tls_handshake=smtp.tls_handshake_timeout_seconds,
        ),
        tls_context=tls_context,
        spool=spool,
        sender_checks=sender_checks(settings, metrics=metrics, workers=workers),
    )
    health = certificate_health or certificate_verdict(None)

    def probe(submission_port: int) -> list[checks.HealthCheck]:
        return health_checks(
            settings,
            store,
            submission_port=submission_port,
            certificate_health=health,
            registry=metrics.registry,
        )

    return Server(
        settings,
        services=services,
        notifier=notifier,
        last_used=last_used,
        budget=budget,
        limiter=ConnectionLimiter(
            max_total=smtp.max_connections,
            max_per_ip=smtp.max_connections_per_ip,
            exempt=smtp.connection_limit_exempt_networks,
            ipv6_prefix_length=smtp.client_ipv6_prefix_length,
        ),
        health_checks=probe,
    )


def sender_checks(
    settings: Settings, *, metrics: Metrics, workers: WorkerPool
) -> SenderChecks | None:
    """Issue 15's checks of MX mail: one authenticator (its DNS cache and worker threads)
    per server, named after ``Smtp:ServerName`` in its Authentication-Results."""
    smtp = settings.smtp
    configured = smtp.mx.sender_authentication
    if not smtp.mx.enabled or configured.mode is Mode.OFF:
        return None
    return SenderChecks(
        SenderAuthenticator(configured, authserv_id=smtp.server_name),
        metrics=metrics,
        header_limit=smtp.mime.limits.max_header_bytes,
        workers=workers,
    )


def open_telemetry(settings: Settings) -> AbstractAsyncContextManager[TelemetryRun]:
    """OTLP export while the block runs when ``Otel:Endpoint`` is set (SPEC §7); its
    flush at the end shares the shutdown budget."""
    return exported(
        settings.otel.endpoint,
        budget=settings.smtp.shutdown_timeout_seconds,
        service_version=__version__,
    )


async def check_store(store: AdminStore) -> None:
    """SPEC §10: a reachable database without the tables stops start-up; an unreachable
    one does not (health reports it and SMTP answers 4xx until it returns)."""
    try:
        await store.check_schema()
    except StoreUnavailable as exc:
        log.warning("database unavailable at start-up, continuing: %s", exc)


# --------------------------------------------------------------------------- signals


async def handle_signals(
    *,
    stop: Callable[[], None],
    reload: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM and SIGINT call ``stop`` (SPEC §10's graceful shutdown); SIGHUP awaits
    ``reload`` (the certificate). Runs until cancelled; started once the signals are
    caught, so none sent after that kills the process the default way."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload()
                continue
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop()


# --------------------------------------------------------------------------- start-up errors


def run_reporting_startup_errors(main: Callable[[], Awaitable[None]]) -> int:
    """``trio.run(main)``; a start-up problem becomes one message and exit status 2."""
    try:
        trio.run(main)
    except BaseException as exc:
        startup = find_exception(exc, _STARTUP_ERRORS)
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


__all__ = [
    "EXIT_STARTUP",
    "build_server",
    "certificate_verdict",
    "check_store",
    "find_exception",
    "handle_signals",
    "health_checks",
    "load_certificates",
    "open_telemetry",
    "reload_certificates",
    "report_startup_error",
    "run_reporting_startup_errors",
    "sender_checks",
    "tls_context_of",
]
