"""A loopback OTLP collector for the telemetry tests: the collector's gRPC services from
``opentelemetry-proto`` served with grpcio, the same requests over http/protobuf from
a small HTTP server, and two broken ones (nothing listening, and one that accepts
connections and never answers).

Requests land in :class:`Received`, which the tests wait on (a condition, never a
sleep) and read back as flat :class:`SpanRecord` and :class:`PointRecord` lists.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import attrs
import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

Attributes = dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def attributes(pairs: Any) -> Attributes:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@attrs.frozen
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    status: int
    tags: Attributes
    resource: Attributes
    scope: tuple[str, str]
    start_ns: int
    end_ns: int


@attrs.frozen
class PointRecord:
    """One data point of one metric, as last exported (cumulative)."""

    metric: str
    unit: str
    kind: str  # "sum" | "histogram" | ...
    monotonic: bool
    value: float  # sum's value, histogram's sum
    count: int  # histogram's count (0 for a sum)
    resource: Attributes
    scope: tuple[str, str]


class Received:
    """Every request a collector was sent, behind one condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def add(self, request: Message) -> None:
        with self._cond:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
            elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metrics.append(request)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 20.0) -> None:
        """Block (in a thread) until ``predicate(self)`` holds; fail after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"collector: condition not met in {timeout} s; spans "
                    f"{sorted({s.name for s in self.spans()})}, metrics "
                    f"{sorted({p.metric for p in self.points()})}"
                )

    def spans(self) -> list[SpanRecord]:
        with self._cond:
            requests = list(self.traces)
        found = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    scope = (scope_spans.scope.name, scope_spans.scope.version)
                    for span in scope_spans.spans:
                        found.append(
                            SpanRecord(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                status=span.status.code,
                                tags=attributes(span.attributes),
                                resource=resource,
                                scope=scope,
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                            )
                        )
        return found

    def points(self) -> list[PointRecord]:
        """Data points in export order (a later one is the newer cumulative value)."""
        with self._cond:
            requests = list(self.metrics)
        found = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    scope = (scope_metrics.scope.name, scope_metrics.scope.version)
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data") or ""
                        if kind == "sum":
                            for point in metric.sum.data_points:
                                value = (
                                    point.as_int if point.HasField("as_int") else point.as_double
                                )
                                found.append(
                                    PointRecord(
                                        metric=metric.name,
                                        unit=metric.unit,
                                        kind=kind,
                                        monotonic=metric.sum.is_monotonic,
                                        value=float(value),
                                        count=0,
                                        resource=resource,
                                        scope=scope,
                                    )
                                )
                        elif kind == "histogram":
                            for hpoint in metric.histogram.data_points:
                                found.append(
                                    PointRecord(
                                        metric=metric.name,
                                        unit=metric.unit,
                                        kind=kind,
                                        monotonic=True,
                                        value=hpoint.sum,
                                        count=hpoint.count,
                                        resource=resource,
                                        scope=scope,
                                    )
                                )
        return found

    def latest(self, metric: str) -> PointRecord | None:
        matching = [point for point in self.points() if point.metric == metric]
        return matching[-1] if matching else None


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    def Export(self, request: Any, context: Any) -> Any:
        self._received.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    def Export(self, request: Any, context: Any) -> Any:
        self._received.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@contextlib.contextmanager
def grpc_collector() -> Iterator[tuple[str, Received]]:
    """``(endpoint, received)`` of a gRPC OTLP collector on loopback."""
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


_HTTP_REQUESTS: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
}


@contextlib.contextmanager
def http_collector() -> Iterator[tuple[str, Received]]:
    """``(endpoint, received)`` of an http/protobuf OTLP collector on loopback; the
    endpoint is the base URL, to which the exporter appends ``/v1/<signal>``."""
    received = Received()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            kinds = _HTTP_REQUESTS.get(self.path)
            if kinds is None:
                self.send_error(404)
                return
            request_type, response_type = kinds
            received.add(request_type.FromString(body))
            reply = response_type().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def down_endpoint() -> str:
    """An endpoint where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def hanging_endpoint() -> Iterator[str]:
    """An endpoint that completes TCP handshakes (the kernel's backlog does) and never
    reads or answers: an exporter's request hangs until its own timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
