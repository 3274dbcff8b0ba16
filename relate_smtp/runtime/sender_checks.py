"""Sender authentication as the MX session drives it (issue 15).

The library (``relate_smtp.sender_auth``) looks things up and decides; this module is the
runtime's side: it feeds the From field to the library while the body streams in, hands
the message to the verdict at the end of data (a large one has its signatures verified
in a worker process, which reads a spooled message itself), bounds the wait by the data
timeout, and records the results: one ``Authentication-Results`` log line, the metrics,
and the attributes a span can carry. Only a refusing verdict in ``enforce`` mode turns
into a reply (550 5.7.1); a DNS failure, a timeout or a bug in the checks never refuses
a message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio
import trio_parallel

from relate_smtp.handlers.delivery import DeliveryOutcome
from relate_smtp.handlers.limits import ParseLimits
from relate_smtp.handlers.message import looks_large
from relate_smtp.handlers.parsing import SpooledMessage, WorkerPool, limit_this_job
from relate_smtp.protocol import sender_not_authenticated
from relate_smtp.runtime.from_header import FromHeaderScanner
from relate_smtp.runtime.metrics import Metrics
from relate_smtp.sender_auth import (
    Check,
    DkimOutcome,
    Mode,
    Result,
    SenderAuthenticator,
    SenderAuthSettings,
    Verdict,
    verify_standalone,
)

__all__ = ["MECHANISMS", "SenderChecks", "TransactionCheck", "span_attributes"]

log = logging.getLogger("relate_smtp.sender_auth")

#: The mechanisms counted for every checked message, in ``Authentication-Results`` order.
MECHANISMS = ("spf", "dkim", "dmarc")
#: ``smtp_rejections`` reason of a message refused for its sender's DMARC (or SPF) policy.
REFUSED = "sender_authentication"


class SenderChecks:
    """One per server: the library's authenticator and what the runtime adds to it."""

    def __init__(
        self,
        authenticator: SenderAuthenticator,
        *,
        metrics: Metrics,
        header_limit: int,
        workers: WorkerPool | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.metrics = metrics
        #: How much of the header section is searched for the From field.
        self.header_limit = header_limit
        self._workers = workers or WorkerPool()
        #: Where transactions' lookups run while the server serves (``run``); None
        #: before, and sessions then use a nursery of their own.
        self.nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the sessions' lookups run in, until cancelled: one for the
        server instead of one opened and closed per MX connection. Each transaction
        cancels its own lookups when it ends (``TransactionCheck.cancel``)."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.nursery = None

    async def verify_elsewhere(
        self, message: bytes | SpooledMessage
    ) -> tuple[tuple[DkimOutcome, ...], tuple[str, ...]]:
        """DKIM of a large message in a worker process; a worker that passes its CPU
        limit (or dies) yields ``temperror``, which never refuses."""
        workers = self._workers
        try:
            return await workers.run(
                verify_in_worker, message, self.authenticator.settings, workers.limits
            )
        except (trio_parallel.BrokenWorkerError, trio.TooSlowError):
            log.info("DKIM of a large message stopped: its worker process ended")
            return (_too_large(),), ()

    @property
    def mode(self) -> Mode:
        return self.authenticator.mode

    def begin(
        self, nursery: trio.Nursery, *, client_ip: str, helo: str, mail_from: str
    ) -> TransactionCheck:
        """MAIL FROM was accepted: SPF starts now, in ``nursery`` (the session's)."""
        check = self.authenticator.begin(
            nursery, client_ip=client_ip, helo=helo, mail_from=mail_from
        )
        return TransactionCheck(self, check, client_ip)


class TransactionCheck:
    """The checks of one mail transaction, from MAIL FROM to the end of data."""

    __slots__ = ("_check", "_checks", "_client_ip", "_scanner", "verdict")

    def __init__(self, checks: SenderChecks, check: Check, client_ip: str) -> None:
        self._checks = checks
        self._check = check
        self._client_ip = client_ip
        self._scanner = FromHeaderScanner(checks.header_limit)
        #: The verdict once ``finish`` has one (for span attributes).
        self.verdict: Verdict | None = None

    def message_chunk(self, data: bytes) -> None:
        """Message bytes as they arrive: the From field starts the DMARC lookup early."""
        scanner = self._scanner
        if not scanner.done:
            value = scanner.feed(data)
            if value is not None:
                self._check.from_header_seen(value)

    def cancel(self) -> None:
        """RSET, a new MAIL, an aborted message or the end of the session."""
        self._check.cancel()

    async def finish(
        self, message: bytes | SpooledMessage, *, wait_limit: float
    ) -> DeliveryOutcome | None:
        """The end of data: the outcome when the message is refused, else None (deliver).

        ``wait_limit`` is what is left of the data timeout; a verdict not reached by then
        lets the message through unchecked, as a DNS failure does.
        """
        checks = self._checks
        started = trio.current_time()
        failed = False
        with trio.move_on_after(wait_limit):
            try:
                self.verdict = await self._verdict(message)
            except Exception:
                # Fail open: a bug here must not stop the mail; the traceback is logged and
                # smtp_internal_errors_total (the ``smtp`` health check) shows it.
                log.exception("sender authentication of a message from %s failed", self._client_ip)
                checks.metrics.internal_error("sender_auth")
                failed = True
        self.cancel()
        waited = trio.current_time() - started
        verdict = self.verdict
        if verdict is None:
            if not failed:
                log.warning(
                    "sender authentication of a message from %s unfinished after %.1f s; "
                    "accepted unchecked",
                    self._client_ip,
                    waited,
                )
                checks.metrics.record_sender_auth(dict.fromkeys(MECHANISMS, "temperror"), waited)
            return None
        refuse = verdict.refuse
        log.info(
            "client=%s action=%s %s",
            self._client_ip,
            "refuse" if refuse else "accept",
            verdict.authentication_results,
        )
        checks.metrics.record_sender_auth(results(verdict), waited)
        if refuse:
            return DeliveryOutcome(reply=sender_not_authenticated(verdict.reason), refused=REFUSED)
        return None

    async def _verdict(self, message: bytes | SpooledMessage) -> Verdict:
        if isinstance(message, bytes) and not looks_large(len(message)):
            return await self._check.verdict(message)
        # A large message's signatures are verified in a worker process, under the same
        # CPU and memory limits as its parse: dkimpy splits and canonicalizes the whole
        # body, which in this process would cost memory and stall the event loop.
        dkim, from_values = await self._checks.verify_elsewhere(message)
        return await self._check.verdict_verified(dkim, from_values)


def verify_in_worker(
    message: bytes | SpooledMessage, settings: SenderAuthSettings, limits: ParseLimits
) -> tuple[tuple[DkimOutcome, ...], tuple[str, ...]]:
    """The worker process's job: DKIM of one large message (read from its spool file)."""
    limit_this_job(limits)
    try:
        raw = Path(message.path).read_bytes() if isinstance(message, SpooledMessage) else message
    except MemoryError:
        return (_too_large(),), ()
    return verify_standalone(raw, settings.dns_servers, settings.dns_timeout_seconds)


def _too_large() -> DkimOutcome:
    return DkimOutcome(result=Result.TEMPERROR, reason="message too large to verify")


def results(verdict: Verdict) -> dict[str, str]:
    """One result per mechanism, ``none`` for one that did not run."""
    found = verdict.by_mechanism()
    return {mechanism: found.get(mechanism, "none") for mechanism in MECHANISMS}


def span_attributes(verdict: Verdict) -> Mapping[str, str | bool]:
    """The results as span attributes (``smtp.sender_auth.*``), for OpenTelemetry."""
    attributes: dict[str, str | bool] = {
        f"smtp.sender_auth.{mechanism}": result for mechanism, result in results(verdict).items()
    }
    attributes["smtp.sender_auth.refused"] = verdict.refuse
    return attributes
