"""A failing metric update is logged and swallowed: it never breaks a session."""

from __future__ import annotations

import logging

import pytest

from relate_smtp.handlers.delivery import DeliveryOutcome
from relate_smtp.protocol import LOCAL_ERROR, message_accepted
from relate_smtp.runtime.metrics import Metrics


class Broken:
    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"metric {name} is broken")


def test_failing_updates_are_logged_and_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    metrics.active_connections = Broken()  # type: ignore[assignment]
    metrics.processing_duration = Broken()  # type: ignore[assignment]
    metrics.sender_auth_wait = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.DEBUG, logger="relate_smtp.metrics"):
        metrics.connection_opened()
        metrics.connection_closed()
        metrics.record_delivery(DeliveryOutcome(reply=message_accepted("Q1")), size=10, elapsed=0.1)
        metrics.record_delivery(
            DeliveryOutcome(reply=LOCAL_ERROR, refused="store_unavailable"), size=10, elapsed=0.1
        )
        metrics.record_sender_auth({"spf": "pass"}, 0.1)
    failures = [r for r in caplog.records if r.message == "metric update failed"]
    assert len(failures) == 5
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)
    # Updates outside the failing ones still count.
    assert metrics.rejections.labels(reason="store_unavailable")._value.get() == 1
    assert metrics.sender_auth_results.labels(mechanism="spf", result="pass")._value.get() == 1


def test_base_exceptions_are_not_swallowed() -> None:
    metrics = Metrics()

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        metrics.safely(interrupted)
