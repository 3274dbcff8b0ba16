"""``SmtpApiKeys.LastUsedAt``, written in the background so that a slow database never
delays an AUTH reply."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime

import trio

from relate_smtp.storage import Store, StoreError

logger = logging.getLogger("relate_smtp.auth")

# Keys remembered for the minimum interval; past this the oldest are forgotten.
_MAX_RECENT_KEYS = 100_000


class LastUsedUpdater:
    """Writes ``SmtpApiKeys.LastUsedAt`` in the background, in batches.

    The runtime starts :meth:`run` in its nursery. :meth:`enqueue` never waits: when the
    queue is full the update is dropped and counted in ``dropped`` (a lost LastUsedAt is
    harmless, a delayed AUTH reply is not). Each store call takes everything queued at
    that moment, up to ``batch_size``, with one entry per key holding its latest time;
    so the slower the database, the bigger the batches. On shutdown, :meth:`close` ends
    the producer side and :meth:`run` returns after flushing what is still queued.
    Store errors are logged and the batch dropped; they never reach a session.

    A key used again within ``min_interval`` seconds of its last queued update is not
    queued again: a client that logs in for every message would otherwise cost one
    database write per message, for a timestamp nobody reads to the second.
    """

    def __init__(
        self,
        store: Store,
        *,
        capacity: int = 1024,
        batch_size: int = 500,
        min_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be at least 1")
        self._store = store
        self._batch_size = batch_size
        self._min_interval = min_interval
        self._clock = clock
        self._recent: dict[uuid.UUID, float] = {}
        self._running = False
        self._finished = trio.Event()
        self.skipped = 0
        self._send, self._receive = trio.open_memory_channel[tuple[uuid.UUID, datetime]](capacity)
        self.dropped = 0
        self.written = 0
        self.failed_batches = 0

    def enqueue(self, key_id: uuid.UUID, used_at: datetime) -> bool:
        """Queue an update without waiting; False when it was dropped (full or closed)."""
        now = self._clock()
        last = self._recent.get(key_id)
        if last is not None and now - last < self._min_interval:
            self.skipped += 1
            return True
        if len(self._recent) >= _MAX_RECENT_KEYS:
            self._forget_before(now - self._min_interval)
        try:
            self._send.send_nowait((key_id, used_at))
        except trio.WouldBlock:
            self.dropped += 1
            logger.debug("LastUsedAt queue full; dropped update for key %s", key_id)
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1
            logger.debug("LastUsedAt updater closed; dropped update for key %s", key_id)
            return False
        self._recent[key_id] = now
        return True

    def _forget_before(self, cutoff: float) -> None:
        self._recent = {key: at for key, at in self._recent.items() if at >= cutoff}
        if len(self._recent) >= _MAX_RECENT_KEYS:
            self._recent.clear()

    def close(self) -> None:
        """No more updates; :meth:`run` flushes the queue and returns."""
        self._send.close()

    async def aclose(self) -> None:
        """Close, then wait until :meth:`run` has written what was queued (if it runs).

        Bound the wait with a cancel scope: the store may be slow or down."""
        self.close()
        if self._running:
            await self._finished.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the queue into the store until :meth:`close` has been called (start it
        with ``nursery.start`` so that :meth:`aclose` knows to wait for it)."""
        self._running = True
        task_status.started()
        try:
            await self._drain()
        finally:
            self._finished.set()

    async def _drain(self) -> None:
        async with self._receive:
            async for key_id, used_at in self._receive:
                batch = {key_id: used_at}
                while len(batch) < self._batch_size:
                    try:
                        key_id, used_at = self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    previous = batch.get(key_id)
                    if previous is None or used_at > previous:
                        batch[key_id] = used_at
                await self._flush(batch)

    async def _flush(self, batch: dict[uuid.UUID, datetime]) -> None:
        try:
            await self._store.touch_api_keys(batch)
        except StoreError as exc:
            self.failed_batches += 1
            logger.warning("Could not update LastUsedAt for %d API keys: %s", len(batch), exc)
        else:
            self.written += len(batch)
