"""One process-wide budget for the memory that parsing and storing large messages take.

A message parsed in a worker comes back as a record holding its decoded bodies and
attachments (about its own size, plus the pickled copy it arrives as), and stays until
it is stored. Without a bound, a flood of large messages multiplies that by the number
of connections. Here each such message first holds its share of ``Smtp:MaxBufferedBytes``;
one that does not fit waits, in arrival order, for earlier ones to be stored. One message
is always let through when nothing else is held, whatever its size, so no message waits
forever for a budget it alone exceeds.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

__all__ = ["BudgetWaitTooLong", "MemoryBudget"]


class BudgetWaitTooLong(Exception):
    """A message waited longer than its data timeout for room in the budget."""


class MemoryBudget:
    """Bytes held by messages being parsed and stored, and those waiting for room."""

    def __init__(self, limit: int, *, on_change: Callable[[int, int], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.waiting = 0
        self._queue: collections.deque[tuple[int, trio.Event]] = collections.deque()
        self._on_change = on_change

    @asynccontextmanager
    async def hold(self, size: int, *, timeout: float) -> AsyncIterator[None]:  # noqa: ASYNC109
        """Hold ``size`` bytes for the duration of the block, waiting up to ``timeout``."""
        if self._queue or not self._fits(size):
            await self._wait(size, timeout)
        else:
            self._take(size)
        try:
            yield
        finally:
            self.held -= size
            self._admit()
            self._changed()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def _take(self, size: int) -> None:
        self.held += size
        self._changed()

    async def _wait(self, size: int, timeout: float) -> None:  # noqa: ASYNC109
        ticket = (size, trio.Event())
        self._queue.append(ticket)
        self.waiting += size
        self._changed()
        admitted = False
        try:
            with trio.move_on_after(timeout):
                await ticket[1].wait()
            admitted = ticket[1].is_set()
        finally:
            self.waiting -= size
            if not admitted:
                if ticket[1].is_set():
                    self.held -= size  # admitted, but the caller is leaving (cancelled)
                else:
                    self._queue.remove(ticket)
                self._admit()  # a message behind it may fit now
            self._changed()
        if not admitted:
            raise BudgetWaitTooLong(f"no room for {size} bytes within {timeout:.0f} s")

    def _admit(self) -> None:
        """Let waiting messages in, in arrival order, while they fit."""
        while self._queue and self._fits(self._queue[0][0]):
            size, event = self._queue.popleft()
            self.held += size
            event.set()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.held, self.waiting)
