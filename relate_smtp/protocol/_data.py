"""Message bodies: the DATA reader (CRLF.CRLF, dot-unstuffing, size cap) and BDAT chunks.

The DATA reader works on whole chunks with C-level searches (``bytes.find``,
``split``/``join``) and never loops over lines or bytes in Python. It holds back at
most five bytes between chunks: just enough that an end marker or a dot line split
across two chunks is still seen.

Only CRLF.CRLF ends a message (RFC 5321 §4.1.1.4). LF.LF, CR.CR, LF.CRLF, CRLF.LF and
the like are content, whatever the bare-LF mode: treating them as an end lets a
message smuggle a second one past a relay that disagrees (SMTP smuggling, 2023).
"""

from __future__ import annotations

import enum
import io

import attrs

from ._replies import Reply

_END = b"\r\n.\r\n"
# RFC 5321 §4.5.2: a line starting with a dot (other than the end marker) loses that
# dot; the client doubled it.
_DOT_LINE = b"\r\n."
_LINE_END = b"\r\n"
# The DATA command's own line end: the body's first line starts after it, so an end
# marker or dot on the first line looks like one on any later line.
_LINE_START = b"\r\n"


def _has_bare_lf(decoder: io.IncrementalNewlineDecoder, region: bytes) -> bool:
    """Whether ``region`` holds an LF not preceded by CR, in one C-level pass.

    The stdlib newline decoder records which line-end kinds it saw ("\\n" alone,
    "\\r\\n", "\\r"); it costs a third of comparing ``count(b"\\n")`` with
    ``count(b"\\r\\n")``. Latin-1 maps bytes to code points one to one.
    """
    decoder.reset()
    decoder.decode(region.decode("latin-1"), final=True)
    kinds = decoder.newlines
    return kinds == "\n" or (isinstance(kinds, tuple) and "\n" in kinds)


class Outcome(enum.Enum):
    """How a message body ended."""

    COMPLETE = "COMPLETE"
    #: Over the size limit; the rest was read and dropped (RFC 5321 §4.2.5: answer after).
    TOO_BIG = "TOO_BIG"
    #: A bare LF in REJECT mode; the rest was read and dropped.
    BARE_LF = "BARE_LF"


def _safe_cut(buf: bytes) -> int:
    """Where to split ``buf`` so no end marker, stuffed dot or CRLF straddles the split.

    Every such pattern starts with CR or LF, so everything before the first CR or LF
    among the last four bytes can be processed now; a CR just before a held LF is held
    too, so a CRLF is never mistaken for a bare LF.
    """
    n = len(buf)
    start = n - 4 if n > 4 else 0
    cut = n
    cr = buf.find(b"\r", start)
    if cr >= 0:
        cut = cr
    lf = buf.find(b"\n", start, cut)
    if lf >= 0:
        cut = lf
        if cut > 0 and buf[cut - 1] == 0x0D:
            cut -= 1
    return cut


class DotReader:
    """Reads one DATA body: feed it bytes until it returns the bytes after the end."""

    __slots__ = ("_at_start", "_held", "_max_size", "_newlines", "_normalize", "outcome", "size")

    def __init__(self, *, max_size: int, normalize_bare_lf: bool) -> None:
        self._held = _LINE_START
        self._at_start = True
        self._max_size = max_size
        self._normalize = normalize_bare_lf
        self._newlines = io.IncrementalNewlineDecoder(None, translate=False)
        #: Octets delivered so far, after unstuffing and normalization.
        self.size = 0
        self.outcome = Outcome.COMPLETE

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Consume ``data``; return (message bytes to deliver, bytes after the end or None)."""
        buf = self._held + data
        # Both the end marker and a stuffed dot start a line with ".": when no line
        # does (one memchr, then one search), neither needs looking for.
        dotted = buf.find(_DOT_LINE) if b"." in buf else -1
        end = buf.find(_END, dotted) if dotted >= 0 else -1
        if end >= 0:
            self._held = b""
            return self._deliver(buf[: end + 2], dotted=True), buf[end + 5 :]
        if self.outcome is not Outcome.COMPLETE:
            self._held = buf[-4:]  # enough to see an end marker split across chunks
            return b"", None
        cut = _safe_cut(buf)
        self._held = buf[cut:]
        return self._deliver(buf[:cut], dotted=0 <= dotted < cut), None

    def _deliver(self, region: bytes, *, dotted: bool) -> bytes:
        if not region or self.outcome is not Outcome.COMPLETE:
            return b""
        if _has_bare_lf(self._newlines, region):
            if not self._normalize:
                self.outcome = Outcome.BARE_LF
                return b""
            region = region.replace(b"\r\n", b"\n").replace(b"\n", _LINE_END)
            dotted = True  # a line after a bare LF may start with a dot too
        if dotted:
            region = _LINE_END.join(region.split(_DOT_LINE))
        if self._at_start:
            region = region[len(_LINE_START) :]
            self._at_start = False
        self.size += len(region)
        if self._max_size and self.size > self._max_size:
            self.outcome = Outcome.TOO_BIG
            return b""
        return region


@attrs.define
class Chunk:
    """One BDAT chunk being read (RFC 3030 §2): binary, counted, never unstuffed."""

    size: int
    last: bool
    #: When set, the bytes are read and dropped and this is the answer once they are:
    #: a refused chunk must still be consumed, or its content would be taken for commands.
    refusal: Reply | None = None
    remaining: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.remaining = self.size
