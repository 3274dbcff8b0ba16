"""Find the From header field while a message streams in, without parsing the message.

DMARC needs the author domain (RFC 7489 §3.1), and the sooner it is known the more of
its DNS lookup overlaps the transfer of the body (issue 15). The scanner looks at the
header section only, as chunks arrive, and stops at the first of: the end of the From
field (the next field or the blank line), the end of the header section, or ``limit``
bytes. Work is bounded by ``limit`` whatever the client sends; the body is never looked
at, and lines are found with ``bytes.find``, never byte by byte.
"""

from __future__ import annotations

__all__ = ["FromHeaderScanner"]

_WSP = (b" ", b"\t")


class FromHeaderScanner:
    """Feed it the message chunk by chunk; it answers the From value once complete."""

    __slots__ = ("_field", "_limit", "_partial", "_seen", "done")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen = 0
        self._partial = b""  # an incomplete line carried to the next chunk
        self._field: list[bytes] | None = None  # the From field's lines so far
        #: Nothing more will be found: the field was returned, or the header ended.
        self.done = False

    def feed(self, data: bytes) -> str | None:
        """The unfolded value of the From field, the first time it is complete."""
        if self.done:
            return None
        room = self._limit - self._seen
        chunk = data[:room]
        self._seen += len(chunk)
        buffer = self._partial + chunk if self._partial else chunk
        # Line by line, so that nothing after the header section is split or copied:
        # the first chunk often holds the whole message.
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            found = self._line(buffer[start:end].removesuffix(b"\r"))
            if found is not None or self.done:
                return found
            start = end + 1
        self._partial = buffer[start:]
        if self._seen >= self._limit:
            self.done = True  # a field cut by the limit is left to the verdict's parse
        return None

    def _line(self, line: bytes) -> str | None:
        if self._field is not None:
            if line[:1] in _WSP:
                self._field.append(line)  # RFC 5322 §2.2.3: folded continuation
                return None
            return self._stop()
        if not line:
            self.done = True  # RFC 5322 §2.1: the blank line ends the header section
        elif line[:5].lower() == b"from:":
            self._field = [line[5:]]
        return None

    def _stop(self) -> str | None:
        """Done; the value of a From field that was being read, unfolded."""
        self.done = True
        lines, self._field = self._field, None
        if not lines:
            return None
        return b"".join(lines).decode("utf-8", "replace").strip()
