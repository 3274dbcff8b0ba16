"""One process's export, from start-up to the flush at shutdown.

Nothing is started when ``Otel:Endpoint`` is empty. Otherwise the SDK is imported and
activated, and at shutdown what it buffered is flushed within what is left of the
shutdown budget (``Smtp:ShutdownTimeoutSeconds``, counted from the stop request, as the
messages in flight and the notifications count it), with a short minimum so a budget
spent on mail still sends the last spans if the collector is quick.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import trio

from relate_smtp import telemetry
from relate_smtp.telemetry import Instruments

if TYPE_CHECKING:
    from relate_smtp.telemetry.otel import Export

__all__ = ["MIN_FLUSH_SECONDS", "TelemetryRun", "exported"]

log = logging.getLogger("relate_smtp.telemetry")

MIN_FLUSH_SECONDS: Final = 1.0


class TelemetryRun:
    """What the composition root holds: the instruments, and the flush at the end."""

    def __init__(self, export: Export | None, *, budget: float) -> None:
        self._export = export
        self._budget = budget
        self._stop_requested: float | None = None

    @property
    def instruments(self) -> Instruments | None:
        return self._export.instruments if self._export is not None else None

    @property
    def instance_id(self) -> str | None:
        return self._export.instance_id if self._export is not None else None

    def stopping(self) -> None:
        """The stop was requested: the flush budget counts from now."""
        if self._stop_requested is None:
            self._stop_requested = trio.current_time()

    async def aclose(self) -> None:
        """Deactivate tracing and flush, within the rest of the budget."""
        export, self._export = self._export, None
        if export is None:
            return
        telemetry.deactivate()
        now = trio.current_time()
        start = self._stop_requested if self._stop_requested is not None else now
        timeout = max(start + self._budget - now, MIN_FLUSH_SECONDS)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(export.close, timeout)


@contextlib.asynccontextmanager
async def exported(
    endpoint: str, *, budget: float, service_version: str
) -> AsyncIterator[TelemetryRun]:
    """Export to ``endpoint`` (none when empty) while the block runs."""
    if not endpoint:
        yield TelemetryRun(None, budget=budget)
        return
    from relate_smtp.telemetry.otel import start_export

    export = await trio.to_thread.run_sync(
        lambda: start_export(endpoint, service_version=service_version)
    )
    run = TelemetryRun(export, budget=budget)
    telemetry.activate(export.tracing)
    try:
        yield run
    finally:
        await run.aclose()
