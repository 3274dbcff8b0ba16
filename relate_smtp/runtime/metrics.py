"""Prometheus metrics of one server (SPEC §7), kept in a prometheus_client registry.

The one place that turns what happened into metrics: handlers return outcomes
(:class:`AuthResult`, :class:`DeliveryOutcome`) and the runtime hands them to the
``record_*`` methods here. Updates go through :meth:`Metrics.safely` so that a failing
metric can never break an SMTP session (the original wrapped its counters in try/catch
for the same reason).

With ``Otel:Endpoint`` set, the same events also feed the original's OpenTelemetry
instruments (meter ``Relate.Smtp``, :class:`~relate_smtp.telemetry.Instruments`), with
the original's meaning: the processing time of stored messages, in milliseconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relate_smtp.handlers.auth import AuthOutcome, AuthResult
from relate_smtp.handlers.delivery import DeliveryOutcome
from relate_smtp.telemetry import Instruments

log = logging.getLogger("relate_smtp.metrics")

INTERNAL_ERRORS: Final = "smtp_internal_errors_total"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _FailuresLogged:
    """``with`` it, a failing metric update is logged and swallowed, so that it never
    breaks a session. A class rather than ``contextlib``: it runs several times per
    message."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        log.debug("metric update failed", exc_info=value)
        return True


_FAILURES_LOGGED = _FailuresLogged()


class Metrics:
    """The server's collectors, registered in ``registry`` (a fresh one by default), and
    the OpenTelemetry ``instruments`` when exporting."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, instruments: Instruments | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.otel = instruments
        r = self.registry
        self.messages_received = Counter(
            "smtp_messages_received", "Messages accepted with 250 at end of data", registry=r
        )
        self.bytes_received = Counter(
            "smtp_bytes_received", "Octets of accepted messages", registry=r
        )
        self.auth_attempts = Counter("smtp_auth_attempts", "AUTH exchanges completed", registry=r)
        self.auth_failures = Counter(
            "smtp_auth_failures", "AUTH attempts answered 535 or 454", registry=r
        )
        self.processing_duration = Histogram(
            "smtp_message_processing_duration_seconds",
            "Time from end of data to the final reply",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_connections = Gauge(
            "smtp_active_connections",
            "SMTP sessions currently open",
            registry=r,
            multiprocess_mode="livesum",  # summed over live workers under --workers
        )
        self.rejections = Counter(
            "smtp_rejections", "Commands or messages refused, by reason", ["reason"], registry=r
        )
        self.tls_sessions = Counter(
            "smtp_tls_sessions", "Completed TLS handshakes, by listener", ["listener"], registry=r
        )
        self.tls_failures = Counter(
            "smtp_tls_handshake_failures",
            "Failed TLS handshakes, by listener",
            ["listener"],
            registry=r,
        )
        self.store_latency = Histogram(
            "smtp_store_latency_seconds",
            "Time to commit one message to the store",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.internal_errors = Counter(
            "smtp_internal_errors",
            "Bugs caught at a session's edge (traceback logged; answered 451 or 421), by where",
            ["where"],
            registry=r,
        )
        self.sender_auth_results = Counter(
            "smtp_sender_auth_results",
            "MX messages checked for sender authentication, by mechanism (spf, dkim, dmarc) "
            "and RFC 8601 result",
            ["mechanism", "result"],
            registry=r,
        )
        self._sender_auth_children: dict[tuple[str, str], Counter] = {}
        self.sender_auth_wait = Histogram(
            "smtp_sender_auth_wait_seconds",
            "Time the end-of-data reply waited for SPF, DKIM and DMARC",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.buffer_budget = Gauge(
            "smtp_buffer_budget_bytes",
            "Smtp:MaxBufferedBytes: memory large messages may hold while parsed and stored",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.buffer_held = Gauge(
            "smtp_buffer_held_bytes",
            "Bytes of the buffer budget held by messages being parsed and stored",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.buffer_waiting = Gauge(
            "smtp_buffer_waiting_bytes",
            "Bytes of messages waiting for room in the buffer budget",
            registry=r,
            multiprocess_mode="livesum",
        )

    def buffer_changed(self, held: int, waiting: int) -> None:
        """The memory budget's figures, as ``MemoryBudget`` reports them."""
        self.safely(lambda: self.buffer_held.set(held))
        self.safely(lambda: self.buffer_waiting.set(waiting))

    def safely(self, update: Callable[[], object]) -> None:
        """Apply one metric update; log and swallow any failure."""
        with _FAILURES_LOGGED:
            update()

    def reject(self, reason: str) -> None:
        self.safely(lambda: self.rejections.labels(reason=reason).inc())

    def connection_opened(self) -> None:
        with _FAILURES_LOGGED:  # per connection: no closure for ``safely``
            self.active_connections.inc()
        otel = self.otel
        if otel is not None:
            self.safely(lambda: otel.connections_active.add(1))

    def connection_closed(self) -> None:
        with _FAILURES_LOGGED:
            self.active_connections.dec()
        otel = self.otel
        if otel is not None:
            self.safely(lambda: otel.connections_active.add(-1))

    def record_auth(self, result: AuthResult) -> None:
        failed = result.outcome is not AuthOutcome.SUCCESS
        self.safely(self.auth_attempts.inc)
        if failed:
            self.safely(self.auth_failures.inc)
        otel = self.otel
        if otel is not None:
            self.safely(lambda: otel.auth_attempts.add(1))
            if failed:
                self.safely(lambda: otel.auth_failures.add(1))

    def record_delivery(self, outcome: DeliveryOutcome, *, size: int, elapsed: float) -> None:
        """One end of data: its final reply after ``elapsed`` seconds, ``size`` octets."""
        accepted = outcome.reply.code < 400
        with _FAILURES_LOGGED:  # per message: no closures for ``safely``
            self.processing_duration.observe(elapsed)
            if accepted:
                self.messages_received.inc()
                self.bytes_received.inc(size)
        if outcome.refused is not None:
            self.reject(outcome.refused)
        stored = outcome.store_seconds
        if stored is not None:
            self.safely(lambda: self.store_latency.observe(stored))
        if accepted:
            otel = self.otel
            if otel is not None:
                # As the original: counted, and timed, only once stored.
                self.safely(lambda: otel.messages_received.add(1))
                self.safely(lambda: otel.bytes_received.add(size))
                self.safely(lambda: otel.processing_duration.record(elapsed * 1000.0))

    def record_sender_auth(self, results: Mapping[str, str], waited: float) -> None:
        """One checked MX message: a result per mechanism, and how long its reply waited."""
        with _FAILURES_LOGGED:  # per message: no closures for ``safely``
            for mechanism, result in results.items():
                self._count_sender_auth(mechanism, result)
            self.sender_auth_wait.observe(waited)

    def _count_sender_auth(self, mechanism: str, result: str) -> None:
        # The labelled child, looked up once per pair: ``labels`` costs more than ``inc``.
        key = (mechanism, result)
        child = self._sender_auth_children.get(key)
        if child is None:
            child = self.sender_auth_results.labels(mechanism=mechanism, result=result)
            self._sender_auth_children[key] = child
        child.inc()

    def record_tls(self, listener: str, *, ok: bool) -> None:
        counter = self.tls_sessions if ok else self.tls_failures
        self.safely(lambda: counter.labels(listener=listener).inc())

    def internal_error(self, where: str) -> None:
        """A bug was caught (its traceback is in the log); the ``smtp`` check shows it."""
        self.safely(lambda: self.internal_errors.labels(where=where).inc())


def internal_error_count(registry: CollectorRegistry) -> int:
    """``smtp_internal_errors_total`` summed over its labels (and, under ``--workers``,
    over the workers, through the parent's multiprocess registry)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == INTERNAL_ERRORS:
                total += sample.value
    return int(total)
