"""Where a message is parsed: inline when small, else in a worker process under limits.

A large or many-part message can cost seconds of CPU and a multiple of its size in
memory to parse. In the server's process that would stall every session: the email
package and ``re`` hold the GIL, so a thread does not help. Worker processes
(trio-parallel) take those messages instead, each job under a CPU-time limit
(``RLIMIT_CPU``) and an address-space limit (``RLIMIT_AS``). A job that passes either
limit ends in :class:`ParseTooCostly` (a temporary reply) and the server goes on; the
MIME limits themselves (:class:`~relate_smtp.handlers.message.MimeLimits`) are checked
inside the parse, so a hostile structure is refused long before it gets that far.
"""

from __future__ import annotations

import logging
import math
import resource
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import trio
import trio_parallel

from relate_smtp.handlers.limits import MimeLimits, ParseLimits
from relate_smtp.handlers.message import build_email, looks_large
from relate_smtp.storage.records import NewEmail

T = TypeVar("T")

log = logging.getLogger("relate_smtp.parsing")

__all__ = [
    "MessageParser",
    "ParseLimits",
    "ParseTooCostly",
    "SpooledMessage",
    "WorkerPool",
    "limit_this_job",
    "message_size",
]

# The wall-clock backstop for a job: its CPU limit times this, plus a start-up allowance
# (a new worker process imports the parser first). A worker past it is killed.
_WALL_CLOCK_FACTOR = 3.0
_WORKER_START_SECONDS = 10.0


@attrs.frozen(kw_only=True)
class SpooledMessage:
    """A message the session wrote to a private file as it arrived (runtime/spool.py).

    The worker process reads the file itself, so the server never holds it whole.
    """

    path: str
    size: int


def message_size(message: bytes | SpooledMessage) -> int:
    return message.size if isinstance(message, SpooledMessage) else len(message)


class ParseTooCostly(Exception):
    """A parse passed its CPU-time, wall-clock or memory limit (451 4.3.0)."""


class WorkerPool:
    """The worker processes for large messages, shared by parsing and DKIM verification:
    at most ``limits.concurrency`` jobs at once, each killed past its wall-clock
    backstop (the CPU limit times a factor, plus a start-up allowance)."""

    def __init__(self, limits: ParseLimits = ParseLimits()) -> None:
        self.limits = limits
        self._limiter = trio.CapacityLimiter(limits.concurrency)
        # Ours is taken first; trio-parallel's own must never queue the job again.
        self._unlimited = trio.CapacityLimiter(math.inf)

    @property
    def deadline(self) -> float:
        return self.limits.cpu_seconds * _WALL_CLOCK_FACTOR + _WORKER_START_SECONDS

    async def run(self, job: Callable[..., T], *args: object) -> T:
        """``job(*args)`` in a worker process; ``trio.TooSlowError`` past the backstop
        (the wait for a free worker does not count), ``BrokenWorkerError`` when the
        process ended (RLIMIT_CPU sends SIGXCPU)."""
        async with self._limiter:
            with trio.fail_after(self.deadline):
                result: T = await trio_parallel.run_sync(
                    job, *args, kill_on_cancel=True, limiter=self._unlimited
                )
                return result


class MessageParser:
    """Turns raw messages into :class:`NewEmail` records without stalling the event loop."""

    def __init__(
        self,
        *,
        max_attachment_size: int,
        mime_limits: MimeLimits = MimeLimits(),
        parse_limits: ParseLimits = ParseLimits(),
        workers: WorkerPool | None = None,
    ) -> None:
        self._max_attachment_size = max_attachment_size
        self._mime_limits = mime_limits
        self._workers = workers or WorkerPool(parse_limits)

    async def parse(
        self,
        message: bytes | SpooledMessage,
        *,
        envelope_recipients: Sequence[str],
        sent_by_user_id: uuid.UUID | None,
    ) -> NewEmail:
        """The message as a record; raises what :func:`build_email` raises, or
        :class:`ParseTooCostly`."""
        envelope = tuple(envelope_recipients)
        if isinstance(message, bytes) and not looks_large(len(message)):
            return build_email(
                message,
                envelope_recipients=envelope,
                sent_by_user_id=sent_by_user_id,
                max_attachment_size=self._max_attachment_size,
                limits=self._mime_limits,
            )
        return await self._in_worker(message, envelope, sent_by_user_id)

    async def _in_worker(
        self, message: bytes | SpooledMessage, envelope: tuple[str, ...], sent_by: uuid.UUID | None
    ) -> NewEmail:
        workers = self._workers
        try:
            return await workers.run(
                build_within_limits,
                message,
                envelope,
                sent_by,
                self._max_attachment_size,
                self._mime_limits,
                workers.limits,
            )
        except trio_parallel.BrokenWorkerError as exc:
            log.warning("message parse stopped: worker process ended (%s)", exc)
            raise ParseTooCostly("the parser's worker process ended") from None
        except trio.TooSlowError:
            log.warning("message parse stopped after %.0f s of wall-clock time", workers.deadline)
            raise ParseTooCostly("parse took too long") from None


def build_within_limits(
    message: bytes | SpooledMessage,
    envelope: tuple[str, ...],
    sent_by: uuid.UUID | None,
    max_attachment_size: int,
    mime_limits: MimeLimits,
    limits: ParseLimits,
) -> NewEmail:
    """:func:`build_email` in a worker process, under this job's CPU and memory limits.

    The CPU limit is relative to what the process has used so far, so a long-lived
    worker gets the same budget for every job. Passing it sends SIGXCPU, which ends the
    process (no core file: RLIMIT_CORE is 0).
    """
    limit_this_job(limits)
    try:
        raw = Path(message.path).read_bytes() if isinstance(message, SpooledMessage) else message
        return build_email(
            raw,
            envelope_recipients=envelope,
            sent_by_user_id=sent_by,
            max_attachment_size=max_attachment_size,
            limits=mime_limits,
        )
    except MemoryError:
        raise ParseTooCostly(f"parse needed more than {limits.memory_bytes} bytes") from None


def limit_this_job(limits: ParseLimits) -> None:
    """This worker job's CPU and address-space limits (any job of a worker process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_soft = math.ceil(usage.ru_utime + usage.ru_stime + limits.cpu_seconds)
    _set_soft_limit(resource.RLIMIT_CPU, cpu_soft)
    _set_soft_limit(resource.RLIMIT_AS, limits.memory_bytes)
    _set_soft_limit(resource.RLIMIT_CORE, 0)


def _set_soft_limit(which: int, value: int) -> None:
    """Set a soft limit, never above the hard one (an operator's limit stays in force)."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, hard))
