"""``relate-smtp serve`` with ``Otel:Endpoint``: the flush at shutdown, its bound, and
one ``service.instance.id`` per ``--workers`` worker."""

from __future__ import annotations

import re
import signal
import smtplib
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import ServeProcess
from tests.telemetry.collector import Received, grpc_collector, hanging_endpoint

INSTANCE = re.compile(r"service\.instance\.id (\S+)")


@pytest.fixture(autouse=True)
def export_only_at_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is exported on the way (a minute between exports), so what the collector
    gets was flushed at shutdown."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)


def send(port: int, count: int) -> None:
    for index in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("a@example.com", ["b@example.org"], f"Subject: {index}\r\n\r\nhi\r\n")


def serve(tmp_path: Path, endpoint: str, *args: str) -> ServeProcess:
    server = ServeProcess(
        tmp_path, "--Smtp:RequireAuthentication=false", f"--Otel:Endpoint={endpoint}", *args
    )
    server.wait_listening({"submission"})
    return server


def stop(server: ServeProcess) -> float:
    """SIGTERM; the seconds until the process had exited (status 0)."""
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0, server.log
    return time.monotonic() - started


def stored_messages(received: Received) -> float:
    """``smtp.messages.received`` summed over the processes that exported it."""
    latest: dict[str, float] = {}
    for point in received.points():
        if point.metric == "smtp.messages.received":
            latest[point.resource["service.instance.id"]] = point.value
    return sum(latest.values())


def test_shutdown_flushes_the_buffered_spans_and_metrics(tmp_path: Path) -> None:
    with grpc_collector() as (endpoint, received):
        server = serve(tmp_path, endpoint)
        try:
            send(server.ports["submission"], 2)
            assert received.spans() == []
            stop(server)
        finally:
            server.kill()
        names = [span.name for span in received.spans()]
        assert names.count("smtp.session") == 2
        assert names.count("db.commit") == 2
        assert stored_messages(received) == 2
    assert "Traceback" not in server.log


def test_a_hanging_collector_does_not_hold_up_the_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "60")
    budget = 2.0
    with hanging_endpoint() as endpoint:
        server = serve(tmp_path, endpoint, f"--Smtp:ShutdownTimeoutSeconds={budget}")
        try:
            send(server.ports["submission"], 1)
            took = stop(server)
        finally:
            server.kill()
    assert took < budget + 3.0, server.log
    assert "telemetry not flushed within" in server.log


def test_each_worker_exports_as_its_own_instance(tmp_path: Path) -> None:
    with grpc_collector() as (endpoint, received):
        server = serve(tmp_path, endpoint, "--workers", "2")
        try:
            lines = server.wait_for(r"service\.instance\.id", count=2)
            instances = {INSTANCE.search(line).group(1) for line in lines}  # type: ignore[union-attr]
            assert len(instances) == 2
            send(server.ports["submission"], 8)
            stop(server)
        finally:
            server.kill()
        exported = {span.resource["service.instance.id"] for span in received.spans()}
        assert exported and exported <= instances
        assert stored_messages(received) == 8
