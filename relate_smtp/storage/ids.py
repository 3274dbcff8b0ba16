"""Time-ordered row ids (UUIDv7, RFC 9562), shared by both stores.

Child rows (recipients, attachments, additional addresses) get time-ordered ids so that
``ORDER BY "Id"`` returns them in the order they were inserted (header order), as EF
Core's Npgsql provider does with its sequential GUIDs; random v4 ids would shuffle them.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid

__all__ = ["new_id"]


class _TimeOrderedIds:
    """UUIDv7 ids, monotonic within the process (a counter in ``rand_a`` orders ids
    drawn in the same millisecond)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self) -> uuid.UUID:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                self._last_ms = ms
                self._counter = secrets.randbits(11)  # leave room to count up
            else:
                self._counter += 1
                if self._counter > 0xFFF:  # 12-bit rand_a exhausted: borrow the next ms
                    self._last_ms += 1
                    self._counter = 0
            ms, counter = self._last_ms, self._counter
        value = (ms & 0xFFFF_FFFF_FFFF) << 80
        value |= 0x7 << 76
        value |= counter << 64
        value |= 0b10 << 62
        value |= secrets.randbits(62)
        return uuid.UUID(int=value)


new_id = _TimeOrderedIds()
