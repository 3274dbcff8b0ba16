"""Group commit (SPEC §5), one implementation for both stores.

A commit costs a WAL flush and, for PostgreSQL, a hop through the asyncio bridge,
whatever it carries. So :meth:`GroupCommit.submit` queues the caller's message and one
caller at a time, the *leader*, takes every queued message (up to ``max_batch`` of
them or ``max_batch_bytes`` of message) and hands them to the backend's ``write_batch``
function, which stores them in one transaction and returns each message's own outcome.
Every caller gets its outcome only once its message is committed, so no 250 goes out
early. When the batch is done the leader passes leadership to the oldest message still
queued: messages arriving meanwhile make the next batch bigger, and no separate task
(nor a nursery to run it in) is needed.

Cancellation: a caller cancelled while its message is still queued withdraws it, so
nothing is stored for a message that will never get its 250. Once its message is in a
batch the batch goes ahead, shielded, because it carries other callers' messages too;
a cancelled leader leaves when its batch is done.

Tracing: each message's trace shows the transaction that stored it, a ``db.commit``
span under its ``smtp.message.save`` with the batch's own start and end, its size
(``db.operation.batch.size``) and whether that message's caller led it. One span per
message rather than one per batch, because a trace is one connection and every message
in the batch waited for the whole transaction.

Closing fails the queued messages at once with :class:`StoreUnavailable` (their senders
retry) and gives the batch in flight a grace period before cancelling it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs
import trio

from relate_smtp import telemetry
from relate_smtp.storage.errors import SchemaMissing, StoreError, StoreUnavailable
from relate_smtp.storage.records import SavedEmail

__all__ = ["GroupCommit", "GroupCommitStats", "Outcome", "copy_error", "describe"]

log = logging.getLogger("relate_smtp.storage")

Item = TypeVar("Item")
Outcome = SavedEmail | Exception
WriteBatch = Callable[[Sequence[Item]], Awaitable[Sequence[Outcome]]]

# Twenty-odd concurrent deliveries fit in one batch; the caps keep one transaction
# short, and a batch that fails for one message's sake (then retried message by
# message) cheap to retry.
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024


@attrs.define
class GroupCommitStats:
    """How the group commit has gone: batches sent, messages in them, the largest
    batch, batches refused and retried message by message, and messages queued now."""

    batches: int = 0
    messages: int = 0
    largest_batch: int = 0
    isolated_batches: int = 0
    queued: int = 0


@attrs.define(eq=False)
class _Pending(Generic[Item]):
    """One caller's message waiting for a batch, and then its outcome."""

    item: Item
    size: int
    trace: object | None = None  # the caller's span, for the commit's span under it
    taken: bool = False  # in a batch: no longer withdrawn when its caller is cancelled
    outcome: Outcome | None = None
    wake: trio.Event = attrs.field(factory=trio.Event)  # outcome known, or asked to lead

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.wake.set()


class GroupCommit(Generic[Item]):
    """The pending-save queue of one store, drained in batches by ``write_batch``.

    ``write_batch(items)`` stores the items in one transaction and returns one outcome
    per item, in order: the saved record, or the exception that item's caller should
    see. An exception it raises fails the whole batch. ``name`` names the store in
    messages ("the SQLite store is closed").
    """

    def __init__(
        self,
        write_batch: WriteBatch[Item],
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write_batch = write_batch
        self._name = name
        self._db_system = name.lower()  # OpenTelemetry's db.system: postgresql, sqlite
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._queue: list[_Pending[Item]] = []
        self._leading = False
        self._idle = trio.Event()
        self._idle.set()
        self._in_flight: trio.CancelScope | None = None
        self._closed = False
        self._stats = GroupCommitStats()

    def stats(self) -> GroupCommitStats:
        """Counters so far (a snapshot)."""
        return attrs.evolve(self._stats, queued=len(self._queue))

    def count_isolated_batch(self) -> None:
        """Called by ``write_batch`` when it retries a refused batch message by message."""
        self._stats.isolated_batches += 1

    async def submit(self, item: Item, *, size: int) -> SavedEmail:
        """Store ``item`` (``size`` bytes of message) in a batch; return once committed."""
        if self._closed:
            raise StoreUnavailable(f"the {self._name} store is closed")
        pending = _Pending(item, size, telemetry.parent())
        self._queue.append(pending)
        if not self._leading:
            # Nobody leads, so the queue held nothing before: this message is first.
            self._leading = True
            self._idle = trio.Event()
        else:
            try:
                await pending.wake.wait()
            except BaseException:
                if not pending.taken:
                    self._queue.remove(pending)
                    if pending.wake.is_set() and pending.outcome is None:
                        self._pass_on()  # asked to lead, but leaving
                raise
        if pending.outcome is None:
            await self._lead()
            await trio.lowlevel.checkpoint_if_cancelled()
        outcome = pending.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    async def _lead(self) -> None:
        """Store one batch (the leader's message first), hand out its outcomes, pass on."""
        batch = self._take_batch()
        outcomes: Sequence[Outcome] | None = None
        started_ns = time.time_ns()
        try:
            with trio.CancelScope(shield=True) as self._in_flight:
                try:
                    outcomes = await self._write_batch([pending.item for pending in batch])
                except Exception as exc:
                    if not isinstance(exc, StoreError):
                        log.error("group commit failed", exc_info=exc)
                    outcomes = [copy_error(exc) for _ in batch]
        finally:
            self._in_flight = None
            if outcomes is None:
                # Cancelled by aclose (or worse): the batch may or may not have been
                # committed; a temporary failure makes the senders retry.
                closed = f"the {self._name} store closed mid-commit"
                outcomes = [StoreUnavailable(closed) for _ in batch]
            self._stats.batches += 1
            self._stats.messages += len(batch)
            self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
            if telemetry.enabled():
                self._trace(batch, outcomes, started_ns)
            for pending, outcome in zip(batch, outcomes, strict=True):
                pending.finish(outcome)
            self._pass_on()

    def _trace(
        self, batch: Sequence[_Pending[Item]], outcomes: Sequence[Outcome], started_ns: int
    ) -> None:
        """One ``db.commit`` span per message of the batch (see the module)."""
        ended_ns = time.time_ns()
        for index, (pending, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            telemetry.record(
                telemetry.SPANS.commit,
                pending.trace,
                start_ns=started_ns,
                end_ns=ended_ns,
                attributes={
                    telemetry.TAGS.db_system: self._db_system,
                    telemetry.TAGS.db_operation: "INSERT",
                    telemetry.TAGS.batch_size: len(batch),
                    telemetry.TAGS.batch_leader: index == 0,
                },
                kind="client",
                error=describe(outcome) if isinstance(outcome, Exception) else None,
            )

    def _take_batch(self) -> list[_Pending[Item]]:
        """The oldest queued messages, up to max_batch of them or max_batch_bytes of
        message (at least one)."""
        size = 0
        count = 0
        for pending in self._queue:
            size += pending.size
            if count == self._max_batch or (count and size > self._max_batch_bytes):
                break
            count += 1
        batch = self._queue[:count]
        del self._queue[:count]
        for pending in batch:
            pending.taken = True
        return batch

    def _pass_on(self) -> None:
        """Make the oldest queued message's caller the leader, or stop leading."""
        if self._queue:
            self._queue[0].wake.set()
        else:
            self._leading = False
            self._idle.set()

    async def aclose(self, grace: float) -> None:
        """Fail the queued messages, give the batch in flight ``grace`` seconds, then
        cancel it; later submissions fail with :class:`StoreUnavailable`."""
        self._closed = True
        queued, self._queue = self._queue, []
        for pending in queued:
            pending.finish(StoreUnavailable(f"the {self._name} store is closing"))
        if self._in_flight is None:
            # Leadership may have been handed to a message just failed: nobody leads.
            self._leading = False
            self._idle.set()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self._idle.wait()
            if self._in_flight is not None:
                self._in_flight.cancel()
            await self._idle.wait()


def describe(exc: BaseException) -> str:
    """``Type: message``, or the type alone when the message is empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def copy_error(exc: Exception) -> StoreError:
    """One exception per caller, of the same kind: an exception object raised in several
    tasks at once would have its traceback rewritten by each."""
    kind: type[StoreError]
    if isinstance(exc, StoreUnavailable):
        kind = StoreUnavailable
    elif isinstance(exc, SchemaMissing):
        kind = SchemaMissing
    else:
        kind = StoreError
    copy = kind(str(exc) if isinstance(exc, StoreError) else describe(exc))
    copy.__cause__ = exc
    return copy
