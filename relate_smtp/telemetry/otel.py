"""The OpenTelemetry SDK behind ``Otel:Endpoint``; imported only when it is set.

As the original's ``AddRelateTelemetry``: traces from source ``Relate.Smtp`` and metrics
from meter ``Relate.Smtp``, resource ``service.name`` ``relate-mail-smtp``, exported over
OTLP to the endpoint, gRPC unless ``OTEL_EXPORTER_OTLP_PROTOCOL`` says ``http/protobuf``.
Each process gets its own ``service.instance.id``, so a collector keeps the
``--workers`` workers apart (their counters add up there).

Export runs on the SDK's threads (BatchSpanProcessor, PeriodicExportingMetricReader):
a session only appends to a queue, so an absent or hanging collector costs it nothing,
and when the queue is full spans are dropped rather than waited for. Failures are one
warning (:mod:`relate_smtp.telemetry.exportlog`), not the SDK's line per export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Status, StatusCode

from relate_smtp.telemetry import Attributes, AttributeValue, Instruments, Kind, Span, names
from relate_smtp.telemetry.exportlog import ExportHealth, routed_sdk_log
from relate_smtp.telemetry.names import SCOPE, SCOPE_VERSION, SERVICE_NAME

__all__ = ["Export", "Protocol", "exporter_protocol", "signal_url", "start_export"]

log = logging.getLogger("relate_smtp.telemetry")

Protocol = Literal["grpc", "http/protobuf"]
PROTOCOL_ENV: Final = "OTEL_EXPORTER_OTLP_PROTOCOL"

_KINDS: Final = {
    "internal": trace.SpanKind.INTERNAL,
    "server": trace.SpanKind.SERVER,
    "client": trace.SpanKind.CLIENT,
}


def exporter_protocol(environ: Mapping[str, str], signal: str) -> Protocol:
    """``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    else gRPC (the .NET exporter's default). Anything else is warned about and ignored."""
    value = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or environ.get(
        PROTOCOL_ENV, ""
    )
    value = value.strip().lower()
    if value in ("", "grpc"):
        return "grpc"
    if value == "http/protobuf":
        return "http/protobuf"
    log.warning("%s=%s is not supported (grpc or http/protobuf): using grpc", PROTOCOL_ENV, value)
    return "grpc"


def signal_url(endpoint: str, signal: str) -> str:
    """The http/protobuf URL of one signal: ``v1/traces`` or ``v1/metrics`` appended to
    the endpoint's path, as OpenTelemetry does for ``OTEL_EXPORTER_OTLP_ENDPOINT``, so
    one base URL serves both signals."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/") + f"/v1/{signal}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _SpanHandle:
    """Our :class:`Span` over an SDK span."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def set_error(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))


class SdkTracing:
    """The active :class:`~relate_smtp.telemetry.Tracing` while exporting."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    @property
    def enabled(self) -> bool:
        return True

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes | None, kind: Kind) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name, kind=_KINDS[kind], attributes=attributes
        ) as sdk_span:
            yield _SpanHandle(sdk_span)

    def parent(self) -> object | None:
        return otel_context.get_current()

    def record(
        self,
        name: str,
        parent: object | None,
        *,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        kind: Kind,
        error: str | None,
    ) -> None:
        context = parent if isinstance(parent, otel_context.Context) else otel_context.Context()
        sdk_span = self._tracer.start_span(
            name, context=context, kind=_KINDS[kind], attributes=attributes, start_time=start_ns
        )
        if error is not None:
            sdk_span.set_status(Status(StatusCode.ERROR, error))
        sdk_span.end(end_time=end_ns)


class _ReportingSpanExporter(SpanExporter):
    """Tells :class:`ExportHealth` how each export went."""

    def __init__(self, inner: SpanExporter, health: ExportHealth) -> None:
        self._inner = inner
        self._health = health

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            self._health.failed("traces", exc)
            return SpanExportResult.FAILURE
        self._health.report("traces", ok=result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _ReportingMetricExporter(MetricExporter):
    """Tells :class:`ExportHealth` how each export went; cumulative temporality, the
    .NET exporter's default."""

    def __init__(self, inner: MetricExporter, health: ExportHealth) -> None:
        super().__init__()
        self._inner = inner
        self._health = health

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis)
        except Exception as exc:
            self._health.failed("metrics", exc)
            return MetricExportResult.FAILURE
        self._health.report("metrics", ok=result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis)


def _span_exporter(endpoint: str, protocol: Protocol) -> SpanExporter:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter(endpoint=signal_url(endpoint, "traces"))
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, insecure=_insecure(endpoint))


def _metric_exporter(endpoint: str, protocol: Protocol) -> MetricExporter:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter(endpoint=signal_url(endpoint, "metrics"))
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=endpoint, insecure=_insecure(endpoint))


def _counter(meter: metrics.Meter, instrument: names.Instrument) -> metrics.Counter:
    return meter.create_counter(
        instrument.name, unit=instrument.unit, description=instrument.description
    )


def _insecure(endpoint: str) -> bool:
    """gRPC without TLS for an ``http://`` endpoint, as the .NET exporter reads it."""
    return urlsplit(endpoint).scheme.lower() != "https"


class Export:
    """The providers of one process while ``Otel:Endpoint`` is set."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        health: ExportHealth,
        restore_log: contextlib.ExitStack,
        instance_id: str,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.health = health
        self._restore_log = restore_log
        self.instance_id = instance_id
        self.tracing = SdkTracing(tracer_provider.get_tracer(SCOPE, SCOPE_VERSION))
        meter = meter_provider.get_meter(SCOPE, SCOPE_VERSION)
        self.instruments = Instruments(
            messages_received=_counter(meter, names.MESSAGES_RECEIVED),
            bytes_received=_counter(meter, names.BYTES_RECEIVED),
            auth_attempts=_counter(meter, names.AUTH_ATTEMPTS),
            auth_failures=_counter(meter, names.AUTH_FAILURES),
            processing_duration=meter.create_histogram(
                names.PROCESSING_DURATION.name,
                unit=names.PROCESSING_DURATION.unit,
                description=names.PROCESSING_DURATION.description,
            ),
            connections_active=meter.create_up_down_counter(
                names.CONNECTIONS_ACTIVE.name,
                unit=names.CONNECTIONS_ACTIVE.unit,
                description=names.CONNECTIONS_ACTIVE.description,
            ),
        )

    def close(self, timeout: float) -> bool:
        """Export what is buffered and stop, within ``timeout`` seconds (blocking; run it
        in a thread). False when time ran out: what was left is dropped, and the SDK's
        threads, being daemons, do not hold up the exit."""
        deadline = time.monotonic() + timeout
        millis = max(timeout, 0.0) * 1000
        threads = [
            threading.Thread(target=self._tracer_provider.shutdown, daemon=True),
            threading.Thread(
                target=self._meter_provider.shutdown,
                kwargs={"timeout_millis": millis},
                daemon=True,
            ),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        finished = not any(thread.is_alive() for thread in threads)
        if not finished:
            log.warning(
                "telemetry not flushed within %.1f s (Smtp:ShutdownTimeoutSeconds): "
                "the rest is dropped",
                timeout,
            )
        self._restore_log.close()
        return finished


def start_export(
    endpoint: str, *, service_version: str, environ: Mapping[str, str] = os.environ
) -> Export:
    """Providers exporting to ``endpoint``, their threads started."""
    health = ExportHealth(endpoint)
    restore_log = contextlib.ExitStack()
    restore_log.enter_context(routed_sdk_log(health))
    instance_id = str(uuid.uuid4())
    resource = Resource.create(
        {
            "service.name": SERVICE_NAME,
            "service.version": service_version,
            "service.instance.id": instance_id,
        }
    )
    # shutdown_on_exit=False: the SDK's atexit hook would flush again, unbounded, after
    # the shutdown budget was spent.
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(
            _ReportingSpanExporter(
                _span_exporter(endpoint, exporter_protocol(environ, "traces")), health
            )
        )
    )
    reader = PeriodicExportingMetricReader(
        _ReportingMetricExporter(
            _metric_exporter(endpoint, exporter_protocol(environ, "metrics")), health
        )
    )
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[reader], shutdown_on_exit=False
    )
    log.info(
        "exporting traces (%s) and metrics (%s) over OTLP to %s as service.instance.id %s",
        exporter_protocol(environ, "traces"),
        exporter_protocol(environ, "metrics"),
        endpoint,
        instance_id,
    )
    return Export(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        health=health,
        restore_log=restore_log,
        instance_id=instance_id,
    )
