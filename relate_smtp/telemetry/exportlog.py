"""One warning when OTLP export starts failing, not one per span or per retry.

The SDK's exporters log each failed export and each retry (at WARNING and ERROR), and
the batch processor each dropped span: with a collector down that is a line every few
seconds for as long as it stays down. Here those records go to the debug level of
``relate_smtp.telemetry.sdk``; :class:`ExportHealth`, told by the exporters' wrappers how
every export went, logs one warning when export starts failing and one line when it
works again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Final

__all__ = ["ExportHealth", "routed_sdk_log"]

log = logging.getLogger("relate_smtp.telemetry")
sdk_log = logging.getLogger("relate_smtp.telemetry.sdk")

SDK_LOGGER: Final = "opentelemetry"


class ExportHealth:
    """Whether export to the collector works, per signal; logs only the changes."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._failing: set[str] = set()
        self._last_problem = ""
        self.failures = 0
        self.successes = 0

    def note(self, problem: str) -> None:
        """What the SDK last said went wrong (quoted by the next warning)."""
        with self._lock:
            self._last_problem = problem

    def report(self, signal: str, *, ok: bool) -> None:
        if ok:
            self.succeeded(signal)
        else:
            self.failed(signal, None)

    def succeeded(self, signal: str) -> None:
        with self._lock:
            self.successes += 1
            if signal not in self._failing:
                return
            self._failing.discard(signal)
            recovered = not self._failing
        if recovered:
            log.info("OTLP export to %s works again", self._endpoint)

    def failed(self, signal: str, exc: BaseException | None) -> None:
        with self._lock:
            self.failures += 1
            first = not self._failing
            self._failing.add(signal)
            problem = repr(exc) if exc is not None else self._last_problem
        if first:
            log.warning(
                "OTLP export of %s to %s failed (%s); telemetry is dropped until the "
                "collector answers, and further failures are logged at debug level only",
                signal,
                self._endpoint,
                problem or "no detail",
            )
        else:
            log.debug("OTLP export of %s to %s failed again (%s)", signal, self._endpoint, problem)


class _ToDebug(logging.Handler):
    """Re-logs the SDK's records at debug level, remembering the last problem."""

    def __init__(self, health: ExportHealth) -> None:
        super().__init__(logging.DEBUG)
        self._health = health

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        if record.levelno >= logging.WARNING:
            self._health.note(message.splitlines()[0] if message else record.name)
        sdk_log.debug("%s: %s", record.name, message)


@contextlib.contextmanager
def routed_sdk_log(health: ExportHealth) -> Iterator[None]:
    """While exporting, the SDK's log records go to debug level (see the module)."""
    sdk = logging.getLogger(SDK_LOGGER)
    handler = _ToDebug(health)
    propagate = sdk.propagate
    sdk.addHandler(handler)
    sdk.propagate = False
    try:
        yield
    finally:
        sdk.removeHandler(handler)
        sdk.propagate = propagate
