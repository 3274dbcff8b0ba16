"""Session deadlines, enforced by one task per Trio run instead of a deadline per read.

Moving a Trio cancel scope's deadline re-registers the scope (a context manager and a
heap push each time). A session moves its deadline around every read and reply, and at
one message per connection that was about 4 % of the server's CPU, for timeouts counted
in minutes. Here a session only writes its deadline into a plain attribute; one system
task per run wakes every ``RESOLUTION`` seconds while sessions are watched and expires
those whose deadline has passed. The same task keeps a coarse clock (``now``) that
sessions read instead of asking Trio for the time on every reply. A deadline therefore
fires up to ``RESOLUTION`` seconds early or late, which timeouts of minutes (RFC 5321
§4.5.3.2) do not notice.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["RESOLUTION", "Deadlines", "Timed", "deadlines"]

#: Seconds between two checks, and the most a coarse reading of ``now`` lags behind.
RESOLUTION = 0.5


class Timed(Protocol):
    """Something with a deadline (``trio.current_time()`` units) to expire at."""

    @property
    def deadline(self) -> float: ...

    def expire(self) -> None:
        """The deadline has passed: interrupt whatever is waiting."""


class Deadlines:
    """The watched objects of one Trio run and the coarse clock they read."""

    __slots__ = ("_wakeup", "_watched", "now")

    def __init__(self) -> None:
        self._watched: set[Timed] = set()
        self._wakeup: trio.Event | None = None
        #: ``trio.current_time()`` as of the last check (or the last ``watch``).
        self.now = trio.current_time()

    def watch(self, timed: Timed) -> None:
        """Check ``timed`` from now on, until ``unwatch``."""
        self._watched.add(timed)
        self.now = trio.current_time()
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def unwatch(self, timed: Timed) -> None:
        self._watched.discard(timed)

    def __len__(self) -> int:
        return len(self._watched)

    def check(self) -> None:
        """Refresh ``now`` and expire every watched object whose deadline has passed."""
        now = self.now = trio.current_time()
        for timed in self._watched:
            if timed.deadline <= now:
                timed.expire()

    async def run(self) -> None:
        """Check every ``RESOLUTION`` seconds while anything is watched, else sleep."""
        while True:
            if not self._watched:
                wakeup = self._wakeup = trio.Event()
                await wakeup.wait()
                continue
            await trio.sleep(RESOLUTION)
            self.check()


_CURRENT: trio.lowlevel.RunVar[Deadlines] = trio.lowlevel.RunVar("relate_smtp_deadlines")


def deadlines() -> Deadlines:
    """This Trio run's deadlines, with their checking task started on first use."""
    try:
        return _CURRENT.get()
    except LookupError:
        current = Deadlines()
        _CURRENT.set(current)
        trio.lowlevel.spawn_system_task(current.run, name="relate_smtp.deadlines")
        return current
