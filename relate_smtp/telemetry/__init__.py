"""Traces and metrics as the original exports them (SPEC §7), or nothing at all.

Every layer with something to trace calls the functions here and never the
OpenTelemetry SDK: :func:`span` opens a child of the current span, :func:`parent` and
:func:`record` let the group commit draw one write under each message it carried. Until
:func:`activate` installs the SDK's tracing (``Otel:Endpoint`` set), they answer with
one shared object that does nothing, so a server without a collector creates, and
imports, no SDK object on the hot path. The metrics go through the runtime's
``Metrics``, which holds :class:`Instruments` only when exporting.

The active tracing is per process, as OpenTelemetry's own provider is: each
``--workers`` worker activates its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Literal, Protocol

import attrs

from relate_smtp.telemetry.names import INSTRUMENTS, SPANS, TAGS

__all__ = [
    "INSTRUMENTS",
    "OFF",
    "SPANS",
    "TAGS",
    "AttributeValue",
    "Counter",
    "Histogram",
    "Instruments",
    "Kind",
    "Span",
    "Tracing",
    "activate",
    "deactivate",
    "enabled",
    "parent",
    "record",
    "span",
]

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]
Kind = Literal["internal", "server", "client"]


class Span(Protocol):
    """The part of a span the code sets: tags (the original's ``SetTag``) and failure."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def set_error(self, description: str) -> None: ...


class Tracing(Protocol):
    """Where spans go: nowhere (:data:`OFF`) or the SDK (``telemetry.otel``)."""

    @property
    def enabled(self) -> bool: ...

    def span(
        self, name: str, attributes: Attributes | None, kind: Kind
    ) -> AbstractContextManager[Span]: ...

    def parent(self) -> object | None: ...

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
    ) -> None: ...


class _NoSpan:
    """A span that records nothing; one instance serves every call."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def set_error(self, description: str) -> None:
        pass


_NO_SPAN = _NoSpan()


class _Off:
    """No collector: spans cost a method call and create nothing."""

    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def span(self, name: str, attributes: Attributes | None, kind: Kind) -> _NoSpan:
        return _NO_SPAN

    def parent(self) -> None:
        return None

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
        pass


OFF: Tracing = _Off()
_active: Tracing = OFF


def activate(tracing: Tracing) -> None:
    """Send this process's spans to ``tracing`` (start-up, once exporting works)."""
    global _active
    _active = tracing


def deactivate() -> None:
    """Back to :data:`OFF` (shutdown, before the exporters are flushed)."""
    global _active
    _active = OFF


def enabled() -> bool:
    """Whether spans are exported: worth computing a tag that costs something."""
    return _active.enabled


def span(
    name: str, attributes: Attributes | None = None, *, kind: Kind = "internal"
) -> AbstractContextManager[Span]:
    """A child of the current span, current itself inside the ``with`` block; an
    exception leaving the block marks it failed."""
    return _active.span(name, attributes, kind)


def parent() -> object | None:
    """The current span, to hang a span recorded later by another task under it."""
    return _active.parent()


def record(
    name: str,
    parent: object | None,
    *,
    start_ns: int,
    end_ns: int,
    attributes: Attributes,
    kind: Kind = "internal",
    error: str | None = None,
) -> None:
    """A finished span under ``parent`` (from :func:`parent`), timed by the caller."""
    _active.record(
        name,
        parent,
        start_ns=start_ns,
        end_ns=end_ns,
        attributes=attributes,
        kind=kind,
        error=error,
    )


class Counter(Protocol):
    def add(self, amount: int | float) -> None: ...


class Histogram(Protocol):
    def record(self, amount: int | float) -> None: ...


@attrs.frozen(kw_only=True)
class Instruments:
    """The original's ``ProtocolMetrics`` for SMTP, on meter ``Relate.Smtp``."""

    messages_received: Counter
    bytes_received: Counter
    auth_attempts: Counter
    auth_failures: Counter
    processing_duration: Histogram
    """Milliseconds."""
    connections_active: Counter
    """An up-down counter: +1 when a session opens, −1 when it closes."""
