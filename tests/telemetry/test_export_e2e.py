"""OTLP export end to end: a real server, real SMTP clients, a real collector on loopback.

After one authenticated submission, one MX delivery (with one relay attempt refused)
and one failed AUTH, the collector holds one trace per connection, rooted at its
``smtp.session`` span, with the original's span names and tags under it, and the
original's six instruments with their units, kinds and values. Over gRPC (the default)
and over http/protobuf (``OTEL_EXPORTER_OTLP_PROTOCOL``).
"""

from __future__ import annotations

import smtplib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import trio

from relate_smtp import __version__, app
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import add_account, client, in_thread, make_settings, running_server
from tests.telemetry.collector import (
    PointRecord,
    Received,
    SpanRecord,
    grpc_collector,
    http_collector,
)

HOSTED = "hosted.example"
ALICE = f"alice@{HOSTED}"
OUTSIDE = "bob@elsewhere.example"
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


def message(subject: str, to: str) -> bytes:
    return (
        f"From: <{ALICE}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test>\r\n\r\nHello.\r\n"
    ).encode()


@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export every 50 ms (spans) and 200 ms (metrics) instead of every 5 s and 60 s."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)


def collector(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> AbstractContextManager[tuple[str, Received]]:
    if protocol == "grpc":
        return grpc_collector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    return http_collector()


def by_trace(spans: list[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return traces


def only(spans: list[SpanRecord], name: str) -> SpanRecord:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def named(spans: list[SpanRecord], name: str) -> Iterator[SpanRecord]:
    return (span for span in spans if span.name == name)


def settled(received: Received) -> bool:
    """Three sessions ended and exported, and metrics showing all of them."""
    sessions = [s for s in received.spans() if s.name == "smtp.session"]
    stored = received.latest("smtp.messages.received")
    active = received.latest("smtp.connections.active")
    failures = received.latest("smtp.auth.failures")
    return (
        len(sessions) >= 3
        and len([s for s in received.spans() if s.name == "db.commit"]) >= 2
        and stored is not None
        and stored.value == 2
        and failures is not None
        and active is not None
        and active.value == 0
    )


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_sessions_are_traces_and_the_originals_metrics_are_exported(
    tmp_path: Path,
    store: SqliteStore,
    monkeypatch: pytest.MonkeyPatch,
    fast_export: None,
    protocol: str,
) -> None:
    account = await add_account(store, ALICE)
    with collector(protocol, monkeypatch) as (endpoint, received):
        settings = make_settings(
            tmp_path,
            "Smtp:Mx:Enabled=true",
            "Smtp:Mx:Port=0",
            f"Smtp:Mx:HostedDomains:0={HOSTED}",
            f"Otel:Endpoint={endpoint}",
        )
        async with (
            app.open_telemetry(settings) as exporting,
            running_server(settings, store, instruments=exporting.instruments) as running,
        ):
            submission, mx = running.port("submission"), running.port("mx")

            def submit() -> None:
                with client(submission) as smtp:
                    smtp.login(ALICE, account.key)
                    smtp.sendmail(ALICE, [OUTSIDE], message("submitted", OUTSIDE))

            def deliver() -> dict[str, tuple[int, bytes]]:
                with client(mx) as smtp:
                    return smtp.sendmail(
                        "sender@foreign.example",
                        [ALICE, "relay@foreign.example"],
                        message("delivered", ALICE),
                    )

            def fail_auth() -> None:
                # One AUTH PLAIN: smtplib.login would go on to try LOGIN.
                with client(submission) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
                    smtp.user, smtp.password = ALICE, "not-the-key"
                    smtp.ehlo()
                    smtp.auth("PLAIN", smtp.auth_plain)

            await in_thread(submit)
            refused = await in_thread(deliver)
            assert set(refused) == {"relay@foreign.example"}
            await in_thread(fail_auth)
            await trio.to_thread.run_sync(lambda: received.wait_for(settled))
            prometheus_bytes = running.server.metrics.registry.get_sample_value(
                "smtp_bytes_received_total"
            )
            instance_id = exporting.instance_id

    spans = received.spans()
    assert {span.resource["service.name"] for span in spans} == {"relate-mail-smtp"}
    assert {span.resource["service.version"] for span in spans} == {__version__}
    assert {span.resource["service.instance.id"] for span in spans} == {instance_id}
    assert {span.scope for span in spans} == {("Relate.Smtp", "1.0.0")}

    traces = by_trace(spans)
    assert len(traces) == 3  # one per connection
    roots = {}
    for trace_spans in traces.values():
        root = only(trace_spans, "smtp.session")
        assert root.parent_id == ""
        assert root.kind == SPAN_KIND_SERVER
        ids = {span.span_id for span in trace_spans}
        assert all(span.parent_id in ids for span in trace_spans if span is not root)
        roots[root.tags["smtp.endpoint_port"], root.tags["smtp.messages"]] = trace_spans

    # The authenticated submission.
    sub = roots[submission, 1]
    assert {s.name for s in sub} == {
        "smtp.session",
        "smtp.auth.validate",
        "smtp.filter.mail_from",
        "smtp.filter.rcpt_to",
        "smtp.message.save",
        "smtp.message.parse",
        "smtp.notify.users",
        "db.commit",
    }
    session = only(sub, "smtp.session")
    assert session.tags["smtp.listener"] == "submission"
    assert session.tags["client.address"] == "127.0.0.1"
    assert session.tags["smtp.outcome"] == "quit"
    auth = only(sub, "smtp.auth.validate")
    assert auth.tags == {"smtp.auth.user": ALICE, "smtp.auth.success": True}
    mail_from = only(sub, "smtp.filter.mail_from")
    assert mail_from.parent_id == session.span_id
    assert mail_from.tags == {
        "smtp.from": ALICE,
        "smtp.endpoint_port": submission,
        "smtp.is_authenticated": True,
    }
    rcpt_to = only(sub, "smtp.filter.rcpt_to")
    assert rcpt_to.tags == {
        "smtp.to": OUTSIDE,
        "smtp.from": ALICE,
        "smtp.endpoint_port": submission,
        "smtp.is_authenticated": True,
    }
    save = only(sub, "smtp.message.save")
    assert save.parent_id == session.span_id
    assert save.tags["smtp.buffer_size"] > 0
    assert save.tags["smtp.message_id"] == "submitted@test"
    assert save.tags["smtp.recipients_count"] == 1
    assert save.tags["smtp.has_attachments"] is False
    parse = only(sub, "smtp.message.parse")
    assert parse.parent_id == save.span_id
    assert parse.tags == {"smtp.size_bytes": save.tags["smtp.buffer_size"]}
    notify = only(sub, "smtp.notify.users")
    assert notify.parent_id == save.span_id
    assert notify.tags == {"smtp.recipient_count": 0}
    commit = only(sub, "db.commit")
    assert commit.parent_id == save.span_id
    assert commit.kind == SPAN_KIND_CLIENT
    assert commit.tags["db.system"] == "sqlite"
    assert commit.tags["db.operation.batch.size"] >= 1
    assert save.start_ns <= commit.start_ns <= commit.end_ns <= save.end_ns

    # The MX delivery: any sender, a hosted recipient, a relay attempt refused.
    inbound = roots[mx, 1]
    mail_from = only(inbound, "smtp.filter.mail_from")
    assert mail_from.tags == {
        "smtp.from": "sender@foreign.example",
        "smtp.endpoint_port": mx,
        "smtp.is_authenticated": False,
    }
    accepted, relayed = sorted(named(inbound, "smtp.filter.rcpt_to"), key=lambda s: s.start_ns)
    assert accepted.tags["smtp.to"] == ALICE
    assert "smtp.relay_rejected" not in accepted.tags
    assert relayed.tags["smtp.to"] == "relay@foreign.example"
    assert relayed.tags["smtp.relay_rejected"] is True
    assert only(inbound, "smtp.notify.users").tags == {"smtp.recipient_count": 1}
    assert only(inbound, "smtp.message.save").tags["smtp.message_id"] == "delivered@test"
    assert "smtp.auth.validate" not in {s.name for s in inbound}

    # The failed AUTH.
    failed = only(roots[submission, 0], "smtp.auth.validate")
    assert failed.tags["smtp.auth.success"] is False

    # The six instruments (ProtocolMetrics.cs): names, units, kinds, values.
    def latest(name: str) -> PointRecord:
        point = received.latest(name)
        assert point is not None, name
        assert point.scope == ("Relate.Smtp", "1.0.0")
        assert point.resource["service.name"] == "relate-mail-smtp"
        return point

    expected = {
        "smtp.messages.received": ("messages", "sum", True, 2),
        "smtp.bytes.received": ("bytes", "sum", True, prometheus_bytes),
        "smtp.auth.attempts": ("attempts", "sum", True, 2),
        "smtp.auth.failures": ("failures", "sum", True, 1),
        "smtp.connections.active": ("connections", "sum", False, 0),
    }
    for name, (unit, kind, monotonic, value) in expected.items():
        point = latest(name)
        assert (point.unit, point.kind, point.monotonic, point.value) == (
            unit,
            kind,
            monotonic,
            value,
        ), name
    duration = latest("smtp.message.processing.duration")
    assert (duration.unit, duration.kind, duration.count) == ("ms", "histogram", 2)
    assert 0 < duration.value < 10_000  # milliseconds, not seconds
