"""End of data: parse, store in one transaction, answer, then notify (SPEC §5, §6).

Content problems never cause a temporary failure; only a transient failure to commit
does (:class:`StoreUnavailable`: nothing partial is stored and the sender is asked to
retry, 451 4.3.0), or a parse that passes its CPU or memory limit. A structure past the
MIME limits is refused (554 5.6.0).

Any other exception is a bug, not weather: it is not caught here but propagates to the
runtime, which logs its traceback, counts it (``smtp_internal_errors_total`` and the
``smtp`` health check) and answers 451 so that no mail is lost while it is seen.

The handler returns a :class:`DeliveryOutcome`; the runtime records the metrics.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import attrs

from relate_smtp import telemetry
from relate_smtp.handlers.budget import BudgetWaitTooLong, MemoryBudget
from relate_smtp.handlers.message import AttachmentTooLarge, MimeLimitExceeded, looks_large
from relate_smtp.handlers.parsing import (
    MessageParser,
    ParseTooCostly,
    SpooledMessage,
    message_size,
)
from relate_smtp.protocol import (
    ATTACHMENT_TOO_BIG,
    INSUFFICIENT_RESOURCES,
    LOCAL_ERROR,
    MESSAGE_TOO_COMPLEX_NOW,
    Reply,
    message_accepted,
    mime_limit_exceeded,
)
from relate_smtp.storage import NewEmail, SavedEmail, Store, StoreUnavailable
from relate_smtp.telemetry import SPANS, TAGS, Span

log = logging.getLogger("relate_smtp.delivery")


class NewMailListener(Protocol):
    """Told about every committed message; must not block (the 250 never waits)."""

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None: ...


@attrs.frozen(kw_only=True)
class DeliveryOutcome:
    """What became of one message: the final reply and what the runtime counts."""

    reply: Reply
    refused: str | None = None
    """Why the message was refused or deferred (a ``smtp_rejections`` reason), if it was."""
    store_seconds: float | None = None
    """How long the commit took, when the message was stored."""


class _DiscardIds:
    """Queue ids for the 250 of discarded messages: unique within the process, without
    a random draw (a system call) per message."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._numbers):016x}"


class MessageDelivery:
    """Turns a received message into stored rows and a reply."""

    def __init__(
        self,
        store: Store,
        *,
        parser: MessageParser,
        discard: bool,
        budget: MemoryBudget | None = None,
        listener: NewMailListener | None = None,
    ) -> None:
        self._store = store
        self._parser = parser
        self._discard = discard
        self._discard_ids = _DiscardIds()
        self._budget = budget
        self._listener = listener

    async def deliver(
        self,
        message: bytes | SpooledMessage,
        *,
        envelope_recipients: Sequence[str],
        sent_by_user_id: uuid.UUID | None,
        wait_limit: float = math.inf,
    ) -> DeliveryOutcome:
        """Store the message and return the final reply for the client.

        A large message first holds its share of the memory budget (twice its size: the
        record and the copy it arrives in from the worker) until it is stored, waiting
        at most ``wait_limit`` seconds for room.
        """
        if self._discard:
            return DeliveryOutcome(reply=message_accepted(self._discard_ids.next()))
        size = message_size(message)
        if self._budget is None or not looks_large(size):
            return await self._parse_and_store(message, envelope_recipients, sent_by_user_id)
        try:
            async with self._budget.hold(2 * size, timeout=wait_limit):
                return await self._parse_and_store(message, envelope_recipients, sent_by_user_id)
        except BudgetWaitTooLong as exc:
            log.warning("message deferred: %s", exc)
            return DeliveryOutcome(reply=INSUFFICIENT_RESOURCES, refused="memory_budget")

    async def _parse_and_store(
        self,
        message: bytes | SpooledMessage,
        envelope_recipients: Sequence[str],
        sent_by_user_id: uuid.UUID | None,
    ) -> DeliveryOutcome:
        """Under the original's ``smtp.message.save`` span (parse, commit, notify)."""
        with telemetry.span(SPANS.save, {TAGS.buffer_size: message_size(message)}) as span:
            outcome = await self._parse_and_store_in(
                span, message, envelope_recipients, sent_by_user_id
            )
            if outcome.refused is not None:
                span.set_attribute(TAGS.refused, outcome.refused)
            return outcome

    async def _parse_and_store_in(
        self,
        span: Span,
        message: bytes | SpooledMessage,
        envelope_recipients: Sequence[str],
        sent_by_user_id: uuid.UUID | None,
    ) -> DeliveryOutcome:
        try:
            with telemetry.span(SPANS.parse, {TAGS.size_bytes: message_size(message)}):
                email = await self._parser.parse(
                    message,
                    envelope_recipients=envelope_recipients,
                    sent_by_user_id=sent_by_user_id,
                )
        except AttachmentTooLarge as exc:
            log.info("message refused: %s", exc)
            return DeliveryOutcome(reply=ATTACHMENT_TOO_BIG, refused="attachment_too_big")
        except MimeLimitExceeded as exc:
            log.info("message refused: %s", exc.what)
            return DeliveryOutcome(reply=mime_limit_exceeded(exc.what), refused="mime_limit")
        except ParseTooCostly as exc:
            log.warning("message deferred: %s", exc)
            return DeliveryOutcome(reply=MESSAGE_TOO_COMPLEX_NOW, refused="parse_limit")
        started = time.perf_counter()
        try:
            saved = await self._store.save_email(email)
        except StoreUnavailable as exc:
            log.warning("message not stored, asked the sender to retry: %s", exc)
            _tag_failure(span, exc)
            return DeliveryOutcome(reply=LOCAL_ERROR, refused="store_unavailable")
        elapsed = time.perf_counter() - started
        if telemetry.enabled():
            _tag_saved(span, email, saved)
        if self._listener is not None:
            with telemetry.span(SPANS.notify, {TAGS.recipient_count: len(saved.linked_user_ids)}):
                self._listener.message_stored(email, saved)
        return DeliveryOutcome(reply=message_accepted(str(saved.id)), store_seconds=elapsed)


def _tag_saved(span: Span, email: NewEmail, saved: SavedEmail) -> None:
    """The original's tags once the message is stored; ``smtp.recipients_count`` counts
    the To/Cc/Bcc mailboxes, as its ``email.Recipients`` did."""
    span.set_attribute(TAGS.recipients_count, len(email.header_recipients))
    span.set_attribute(TAGS.message_id, email.message_id)
    if saved.thread_id is not None:
        span.set_attribute(TAGS.thread_id, str(saved.thread_id))
    span.set_attribute(TAGS.has_attachments, bool(email.attachments))


def _tag_failure(span: Span, exc: BaseException) -> None:
    """The original's error status and ``exception.*`` tags."""
    span.set_error(str(exc))
    span.set_attribute(TAGS.exception_type, type(exc).__name__)
    span.set_attribute(TAGS.exception_message, str(exc))
