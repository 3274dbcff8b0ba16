"""The telemetry module without a collector: nothing of the SDK is loaded or made, and
the pieces of the export that need no network."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from relate_smtp import telemetry
from relate_smtp.telemetry.exportlog import ExportHealth
from relate_smtp.telemetry.otel import exporter_protocol, signal_url


def test_without_an_endpoint_the_sdk_is_never_imported() -> None:
    """A server built and run through its composition root, one session included,
    leaves ``opentelemetry`` out of ``sys.modules``."""
    code = """
import sys
import trio
from relate_smtp import app, telemetry
from relate_smtp.config import load_settings

async def main():
    settings = load_settings(overrides=["Smtp:Port=0", "Storage:DiscardMessages=true"],
                             environ={}, cwd=".")
    async with app.open_telemetry(settings) as exporting:
        assert exporting.instruments is None
        with telemetry.span("smtp.session") as span:
            span.set_attribute("smtp.outcome", "quit")
        assert telemetry.parent() is None

trio.run(main)
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_spans_are_one_shared_object_that_does_nothing() -> None:
    assert not telemetry.enabled()
    first = telemetry.span("a", {"k": 1})
    with first as span, telemetry.span("b") as inner:
        span.set_attribute("k", 2)
        span.set_error("no")
        assert inner is span
    assert first is telemetry.span("c")


@pytest.mark.parametrize(
    ("endpoint", "traces"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example/otlp", "https://otel.example/otlp/v1/traces"),
    ],
)
def test_http_urls_append_the_signal_path(endpoint: str, traces: str) -> None:
    assert signal_url(endpoint, "traces") == traces


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": " GRPC "}, "grpc"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            "http/protobuf",
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "grpc"),
    ],
)
def test_the_protocol_is_grpc_unless_the_environment_says_otherwise(
    environ: dict[str, str], expected: str
) -> None:
    assert exporter_protocol(environ, "traces") == expected


def test_failures_are_one_warning_until_export_works_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relate_smtp.telemetry")
    health = ExportHealth("http://collector:4317")
    health.note("StatusCode.UNAVAILABLE")
    for _ in range(5):
        health.report("traces", ok=False)
        health.report("metrics", ok=False)
    health.report("traces", ok=True)
    health.report("metrics", ok=True)
    health.report("metrics", ok=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2  # down, then down again after it came back
    assert "StatusCode.UNAVAILABLE" in warnings[0]
    assert infos == ["OTLP export to http://collector:4317 works again"]
