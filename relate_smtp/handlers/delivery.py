"""End of data: parse, store in one transaction, answer, then notify (SPEC §5, §6).

Content problems never cause a temporary failure; only a failure to commit does, and
then nothing partial is stored and the sender is asked to retry (451 4.3.0).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import trio

from relate_smtp.handlers.message import AttachmentTooLarge, build_email, looks_large
from relate_smtp.protocol import ATTACHMENT_TOO_BIG, LOCAL_ERROR, Reply, message_accepted
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.storage import NewEmail, SavedEmail, Store, StoreUnavailable

log = logging.getLogger("relate_smtp.delivery")


class NewMailListener(Protocol):
    """Told about every committed message; must not block (the 250 never waits)."""

    def message_stored(self, email: NewEmail, saved: SavedEmail) -> None: ...


class MessageDelivery:
    """Turns a received message into stored rows and a reply."""

    def __init__(
        self,
        store: Store,
        *,
        max_attachment_size: int,
        discard: bool,
        metrics: Metrics,
        listener: NewMailListener | None = None,
        parse_limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._store = store
        self._max_attachment_size = max_attachment_size
        self._discard = discard
        self._metrics = metrics
        self._listener = listener
        self._parse_limiter = parse_limiter or trio.CapacityLimiter(2)

    async def deliver(
        self,
        raw: bytes,
        *,
        envelope_recipients: Sequence[str],
        sent_by_user_id: uuid.UUID | None,
    ) -> Reply:
        """Store the message and return the final reply for the client."""
        if self._discard:
            return message_accepted(uuid.uuid4().hex)
        try:
            email = await self._build(raw, envelope_recipients, sent_by_user_id)
        except AttachmentTooLarge as exc:
            log.info("message refused: %s", exc)
            self._metrics.reject("attachment_too_big")
            return ATTACHMENT_TOO_BIG
        started = time.perf_counter()
        try:
            saved = await self._store.save_email(email)
        except StoreUnavailable as exc:
            log.warning("message not stored, asked the sender to retry: %s", exc)
            self._metrics.reject("store_unavailable")
            return LOCAL_ERROR
        except Exception:
            log.exception("message not stored, asked the sender to retry")
            self._metrics.reject("store_error")
            return LOCAL_ERROR
        elapsed = time.perf_counter() - started
        self._metrics.safely(lambda: self._metrics.store_latency.observe(elapsed))
        if self._listener is not None:
            self._listener.message_stored(email, saved)
        return message_accepted(str(saved.id))

    async def _build(
        self, raw: bytes, envelope: Sequence[str], sent_by: uuid.UUID | None
    ) -> NewEmail:
        def build() -> NewEmail:
            return build_email(
                raw,
                envelope_recipients=envelope,
                sent_by_user_id=sent_by,
                max_attachment_size=self._max_attachment_size,
            )

        if looks_large(len(raw)):
            return await trio.to_thread.run_sync(build, limiter=self._parse_limiter)
        return build()
