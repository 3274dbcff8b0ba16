"""A collector that is down, or that accepts and never answers: mail flows, replies are
not delayed beyond noise, and the log says so once, not once per span or retry."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from relate_smtp import app
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import (
    Account,
    add_account,
    client,
    in_thread,
    make_settings,
    running_server,
    watch_log,
)
from tests.telemetry.collector import down_endpoint, hanging_endpoint

ALICE = "alice@example.com"
TRANSACTIONS = 6
EXPORT_TIMEOUT = 3.0  # seconds: a reply waiting on an export would take at least this


@contextmanager
def down() -> Iterator[str]:
    yield down_endpoint()


def send(port: int, account: Account, index: int) -> float:
    """One whole transaction on its own connection; how long it took."""
    started = time.perf_counter()
    with client(port) as smtp:
        smtp.login(ALICE, account.key)
        smtp.sendmail(ALICE, ["bob@example.org"], f"Subject: {index}\r\n\r\nhi\r\n".encode())
    return time.perf_counter() - started


async def timed_transactions(
    tmp_path: Path, store: SqliteStore, account: Account, *overrides: str
) -> list[float]:
    settings = make_settings(tmp_path, *overrides)
    async with (
        app.open_telemetry(settings) as exporting,
        running_server(settings, store, instruments=exporting.instruments) as running,
    ):
        port = running.port("submission")
        return [await in_thread(lambda i=i: send(port, account, i)) for i in range(TRANSACTIONS)]


@pytest.mark.parametrize("broken", [down, hanging_endpoint], ids=["down", "hanging"])
async def test_a_broken_collector_delays_no_reply_and_is_one_warning(
    tmp_path: Path,
    store: SqliteStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken: type[AbstractContextManager[str]],
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(EXPORT_TIMEOUT))
    account = await add_account(store, ALICE)
    baseline = await timed_transactions(tmp_path, store, account)

    caplog.set_level(logging.DEBUG, logger="relate_smtp.telemetry")
    with broken() as endpoint, watch_log("relate_smtp.telemetry", logging.DEBUG) as log:
        settings = make_settings(tmp_path, f"Otel:Endpoint={endpoint}")
        async with (
            app.open_telemetry(settings) as exporting,
            running_server(settings, store, instruments=exporting.instruments) as running,
        ):
            port = running.port("submission")
            timings = [
                await in_thread(lambda i=i: send(port, account, i)) for i in range(TRANSACTIONS)
            ]
            # The first failure is the warning; wait for later ones, which must not be.
            await log.wait_for("failed again", count=2, timeout=6 * EXPORT_TIMEOUT)

    assert len(await store.list_emails(100)) == 2 * TRANSACTIONS
    # A reply held up by an export would take EXPORT_TIMEOUT seconds.
    assert max(timings) < EXPORT_TIMEOUT / 2, (timings, baseline)
    assert statistics.median(timings) < 3 * statistics.median(baseline) + 0.1, (timings, baseline)
    warnings = [
        record
        for record in caplog.records
        if record.levelno >= logging.WARNING
        and record.name.startswith(("relate_smtp.telemetry", "opentelemetry"))
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "OTLP export of " in warnings[0].getMessage()
    assert endpoint in warnings[0].getMessage()
