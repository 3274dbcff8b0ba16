"""Who holds the health endpoint's connections, and whom a newcomer displaces.

The caps evict rather than refuse (see :mod:`relate_smtp.runtime.health`); this table
only decides, the server cancels.
"""

from __future__ import annotations

import itertools

import attrs
import trio


@attrs.define(eq=False)
class Slot:
    """One admitted connection. ``idle_since`` orders those waiting for a request (None
    while one is answered); cancelling ``scope`` evicts the connection."""

    client: str
    opened: int
    idle_since: int | None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@attrs.frozen
class Eviction:
    slot: Slot
    reason: str


class ConnectionTable:
    """Who holds the endpoint's connections, and whom a newcomer displaces.

    No I/O and no clock: the order of events is the only time it knows, so the choice of
    victim is exact and testable. The server cancels the victim's scope.
    """

    def __init__(self, *, max_total: int, max_per_client: int) -> None:
        if max_total < 1 or max_per_client < 1:
            raise ValueError("connection caps must be at least 1")
        self._max_total = max_total
        self._max_per_client = max_per_client
        self._slots: set[Slot] = set()
        self._by_client: dict[str, set[Slot]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, client: str) -> tuple[Slot, Eviction | None]:
        """A slot for a new connection from ``client`` (idle until it has a request), and
        the connection it displaces, already released, if a cap was reached."""
        eviction: Eviction | None = None
        mine = self._by_client.get(client, set())
        if len(mine) >= self._max_per_client:
            eviction = Eviction(victim(mine), "too many connections from one client")
        elif len(self._slots) >= self._max_total:
            eviction = Eviction(victim(self._slots), "too many connections")
        if eviction is not None:
            self.release(eviction.slot)
        tick = next(self._order)
        slot = Slot(client=client, opened=tick, idle_since=tick)
        self._slots.add(slot)
        self._by_client.setdefault(client, set()).add(slot)
        return slot, eviction

    def idle(self, slot: Slot) -> None:
        """``slot`` now waits for a request (or lingers): first in line for eviction."""
        slot.idle_since = next(self._order)

    def busy(self, slot: Slot) -> None:
        """``slot`` has a whole request and is being answered."""
        slot.idle_since = None

    def release(self, slot: Slot) -> None:
        """Forget ``slot``; releasing it twice (evicted, then closed) is harmless."""
        self._slots.discard(slot)
        mine = self._by_client.get(slot.client)
        if mine is not None:
            mine.discard(slot)
            if not mine:
                del self._by_client[slot.client]


def victim(slots: set[Slot]) -> Slot:
    """The first of ``slots`` in eviction order (a cap holds a few dozen: a scan is cheap)."""
    return min(slots, key=_eviction_order)


def _eviction_order(slot: Slot) -> tuple[bool, int]:
    """Idle connections first, the longest idle first; then busy ones, the oldest first."""
    if slot.idle_since is not None:
        return (False, slot.idle_since)
    return (True, slot.opened)
