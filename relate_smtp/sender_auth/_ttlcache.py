"""A small bounded mapping whose entries expire, for results derived from DNS answers.

A result computed only from cached DNS answers stays right until the first of those
answers expires; keeping it that long (and no longer) saves recomputing it for every
message of a sender seen again. The clock is ``time.time()``, the one dnspython's cache
expires answers by.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most ``size`` entries, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value while it is fresh, else None (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= time.time():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, expires: float) -> None:
        """Keep ``value`` until ``expires`` (an absolute ``time.time()``)."""
        if expires <= time.time():
            return
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
