"""A result computed in the background and awaited later, cancellable on its own.

The work runs in a nursery the caller owns (the session's), under a cancel scope of its
own, so ending a transaction cancels just its lookups. An exception from the work is
kept and raised where the result is awaited, not into the caller's nursery, so a
failed lookup cannot take the whole connection down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class Pending(Generic[T]):
    """``fn()`` started now in ``nursery``; ``await result()`` whenever needed."""

    def __init__(self, nursery: trio.Nursery, fn: Callable[[], Awaitable[T]]) -> None:
        self._fn = fn
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._outcome: outcome.Outcome[T] | None = None
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            with self._scope:
                try:
                    value = await self._fn()
                except Exception as exc:
                    # Raised again by result(), in the task that wants it.
                    self._outcome = outcome.Error(exc)
                else:
                    self._outcome = outcome.Value(value)
        finally:
            self._done.set()

    @classmethod
    def resolved(cls, value: T) -> Pending[T]:
        """A result known already: no task, nothing to wait for (and no cancel scope or
        event, which ``cancel`` and ``result`` never touch once there is an outcome)."""
        pending = cls.__new__(cls)
        pending._outcome = outcome.Value(value)
        return pending

    def cancel(self) -> None:
        """Stop the work; nothing is raised anywhere."""
        if self._outcome is None:
            self._scope.cancel()

    async def result(self) -> T:
        """The value, waiting for it if needed; recomputed here if it was cancelled."""
        if self._outcome is None:
            await self._done.wait()
        if self._outcome is None:
            return await self._fn()
        return self._outcome.unwrap()
