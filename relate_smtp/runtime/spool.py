"""Message bodies as they arrive: in memory up to a threshold, then in a private file.

Holding every message whole in memory lets a flood of large messages from anyone on
port 25 drive the process out of memory. Postfix writes each message to a queue file
as it arrives; here a message stays in memory (today's zero-copy path) until it passes
``Smtp:SpoolThresholdBytes``, then it and the rest of it go to a file created 0600 in
``Storage:SpoolPath``. The file is removed when the transaction ends in any way; files
left by a process that was killed are removed at the next start.

Writes go straight to the file without a thread hand-off: they land in the page cache
and cost less than a scheduler round trip, as Postfix's own queue writes do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from relate_smtp.config import SmtpSettings
from relate_smtp.handlers.parsing import SpooledMessage

log = logging.getLogger("relate_smtp.spool")

__all__ = ["DEFAULT_SPOOL_THRESHOLD", "PREFIX", "MessageBuffer", "Spool"]

#: ``Smtp:SpoolThresholdBytes``: most mail is far smaller and never touches the disk.
DEFAULT_SPOOL_THRESHOLD = SmtpSettings().spool_threshold_bytes

#: Spool files are named ``<PREFIX><pid>-<random>``: the pid tells whose file it is.
PREFIX = "relate-smtp-spool-"


class Spool:
    """The directory and threshold for message files, shared by a server's sessions."""

    def __init__(self, directory: str | None, threshold: int) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.threshold = threshold

    def buffer(self) -> MessageBuffer:
        """An empty buffer for the next message."""
        return MessageBuffer(self)

    def remove_leftovers(self) -> int:
        """Delete the files of processes that no longer run; returns how many.

        Files of live processes stay: with ``--workers`` several servers share the
        directory, and each removes only what a dead one left.
        """
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if _left_by_dead_process(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.info("removed %d spool file(s) left in %s", removed, self.directory)
        return removed


def _left_by_dead_process(name: str) -> bool:
    if not name.startswith(PREFIX):
        return False
    pid_text = name[len(PREFIX) :].partition("-")[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


class MessageBuffer:
    """One message's bytes: a list of chunks, or an open private file past the threshold."""

    __slots__ = ("_chunks", "_file", "_path", "_spool", "failed", "size")

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._chunks: list[bytes] = []
        self._file: int | None = None
        self._path: str | None = None
        self.size = 0
        #: The spool could not be written (disk full, directory gone): answer 452.
        self.failed = False

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self.failed:
            return
        try:
            if self._file is not None:
                _write_all(self._file, data)
                return
            self._chunks.append(data)
            if self.size > self._spool.threshold:
                self._spill()
        except OSError as exc:
            log.warning("message not spooled to %s: %s", self._spool.directory, exc)
            size = self.size
            self.discard()
            self.size, self.failed = size, True

    def _spill(self) -> None:
        # mkstemp creates the file 0600 (O_EXCL), whatever the umask.
        fd, self._path = tempfile.mkstemp(
            prefix=f"{PREFIX}{os.getpid()}-", dir=self._spool.directory
        )
        self._file = fd
        log.debug("message spooled to %s", self._path)
        for chunk in self._chunks:
            _write_all(fd, chunk)
        self._chunks = []

    def finish(self) -> bytes | SpooledMessage:
        """The whole message: its bytes, or the closed file holding them."""
        if self._file is None:
            data = b"".join(self._chunks)
            self._chunks = []
            return data
        os.close(self._file)
        self._file = None
        assert self._path is not None
        return SpooledMessage(path=self._path, size=self.size)

    def discard(self) -> None:
        """Forget the message and remove its file; safe to call more than once."""
        self._chunks = []
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self._path).unlink()
            self._path = None
        self.size = 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
