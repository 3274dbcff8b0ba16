"""The receive buffer: lines for commands, raw bytes for message bodies.

Searches resume where they stopped (as h11's ReceiveBuffer), so feeding a long line a
byte at a time stays linear. A line longer than its limit is never held: the buffer
drops it and switches to discarding up to the next LF, then reports it once.
"""

from __future__ import annotations

import enum


class Line(enum.Enum):
    """Outcomes of `ReceiveBuffer.next_line` other than a complete line."""

    #: No complete line yet.
    INCOMPLETE = "INCOMPLETE"
    #: An over-long line has been discarded up to and including its LF.
    TOO_LONG = "TOO_LONG"


class ReceiveBuffer:
    """Bytes received and not yet consumed; memory bounded by the line limits."""

    __slots__ = ("_data", "_discarding", "_search_from")

    def __init__(self) -> None:
        self._data = bytearray()
        self._search_from = 0
        self._discarding = False

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data

    def clear(self) -> None:
        self._data.clear()
        self._search_from = 0
        self._discarding = False

    def next_line(self, limit: int, longer: tuple[tuple[bytes, int], ...] = ()) -> bytes | Line:
        """The next line including its LF, or a `Line` outcome.

        A line may be ``limit`` octets long including its line end, or more when it
        starts with one of the ``longer`` prefixes (upper case, compared
        case-insensitively): RFC 4954 lets AUTH and the extensions let MAIL exceed 512
        octets. Only LF ends a line: a bare CR is content.
        """
        data = self._data
        end = data.find(b"\n", self._search_from)
        if self._discarding:
            if end < 0:
                data.clear()
                return Line.INCOMPLETE
            del data[: end + 1]
            self._discarding = False
            self._search_from = 0
            return Line.TOO_LONG
        length = end + 1 if end >= 0 else len(data) + 1  # a partial line grows at least by LF
        if length > limit and length > _longer_limit(data, longer):
            if end < 0:
                data.clear()
                self._search_from = 0
                self._discarding = True
                return Line.INCOMPLETE
            del data[: end + 1]
            self._search_from = 0
            return Line.TOO_LONG
        if end < 0:
            self._search_from = len(data)
            return Line.INCOMPLETE
        line = bytes(data[: end + 1])
        del data[: end + 1]
        self._search_from = 0
        return line

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the front, for a BDAT chunk."""
        data = self._data
        if limit >= len(data):
            out = bytes(data)
            data.clear()
        else:
            out = bytes(data[:limit])
            del data[:limit]
        self._search_from = 0
        return out

    def take_all(self) -> bytes:
        """Everything buffered, for the DATA body reader."""
        out = bytes(self._data)
        self._data.clear()
        self._search_from = 0
        return out

    def put_back(self, data: bytes) -> None:
        """Return bytes read past a message's end, to be parsed as commands."""
        self._data[0:0] = data
        self._search_from = 0


def _longer_limit(data: bytearray, longer: tuple[tuple[bytes, int], ...]) -> int:
    """The limit of the first prefix ``data`` starts with; 0 when none matches."""
    for prefix, limit in longer:
        if data[: len(prefix)].upper() == prefix:
            return limit
    return 0
