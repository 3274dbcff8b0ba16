"""The API the SMTP session drives: one ``Check`` per mail transaction.

Timeline (issue 15: the DNS work overlaps the transfer of the body):

- MAIL FROM accepted → ``authenticator.begin(nursery, ...)`` starts SPF at once;
- From header field seen while the body streams → ``check.from_header_seen(value)``
  starts the DMARC record discovery;
- end of data → ``await check.verdict(message)`` verifies DKIM, waits for the rest and
  decides;
- RSET, a refused transaction or a closing connection → ``check.cancel()``.
"""

from __future__ import annotations

import functools
import random as _random
from collections.abc import Callable, Iterable

import authres
import trio

from . import _reasons
from ._dkim import check_dkim, parse_message
from ._dmarc import PolicyRecord, discover, discover_cached, evaluate
from ._domains import author_domains, organizational_domain
from ._pending import Pending
from ._report import authentication_results
from ._resolver import Resolver
from ._results import Disposition, DkimOutcome, DmarcOutcome, Result, SpfOutcome, Verdict
from ._settings import Mode, SenderAuthSettings
from ._spf import SpfResults, cached_spf, evaluate_spf

#: Worker threads for pyspf evaluations and DKIM parsing/crypto at once. A pyspf thread
#: mostly waits for DNS answered on Trio, so this is sized for concurrent transactions,
#: not for cores.
WORKER_THREADS = 32
#: Messages up to this size are parsed and verified on the event loop (a few hundred
#: microseconds for typical mail, less than the thread hand-offs would cost); larger
#: ones in a worker thread. The same bound as the MIME parser's inline parse.
INLINE_DKIM_BYTES = 64 * 1024
#: SPF results kept within their DNS answers' TTLs: (client IP, MAIL FROM, HELO) triples.
SPF_RESULTS_CACHED = 4096
#: Author domains evaluated per message (RFC 7489 §6.6.1 evaluates each); bounds the
#: DNS work one From field can cause.
MAX_AUTHOR_DOMAINS = 10


class SenderAuthenticator:
    """Long-lived: holds the settings, the cached resolver and the worker limiter."""

    def __init__(
        self,
        settings: SenderAuthSettings,
        *,
        authserv_id: str,
        resolver: Resolver | None = None,
        random: Callable[[], float] = _random.random,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """Build once at start-up.

        Without ``resolver`` one is made from the settings (reading the system's
        resolver configuration when ``DnsServers`` is empty). ``random`` draws the
        ``pct`` samples (RFC 7489 §6.6.4); tests inject a fixed one.
        """
        self.settings = settings
        self.authserv_id = authserv_id
        self._random = random
        self._limiter = limiter or trio.CapacityLimiter(WORKER_THREADS)
        self._resolver = resolver
        self._spf_results = SpfResults(SPF_RESULTS_CACHED)
        if settings.mode is not Mode.OFF:
            if self._resolver is None:
                self._resolver = Resolver.create(
                    settings.dns_servers, timeout=settings.dns_timeout_seconds
                )
            organizational_domain("example.com")  # loads the packaged PSL now, not mid-session

    @property
    def mode(self) -> Mode:
        return self.settings.mode

    def begin(self, nursery: trio.Nursery, *, client_ip: str, helo: str, mail_from: str) -> Check:
        """Start checking one transaction; call when MAIL FROM is accepted.

        ``client_ip`` is the peer's address (the PROXY header's when PROXY is in use),
        ``helo`` the EHLO/HELO argument, ``mail_from`` the reverse-path without angle
        brackets (``""`` for the null sender). Background work runs in ``nursery``.
        """
        return Check(self, nursery, client_ip=client_ip, helo=helo, mail_from=mail_from)


class Check:
    """Sender authentication of one transaction; see the module docstring for when."""

    def __init__(
        self,
        authenticator: SenderAuthenticator,
        nursery: trio.Nursery,
        *,
        client_ip: str,
        helo: str,
        mail_from: str,
    ) -> None:
        self._auth = authenticator
        self._nursery = nursery
        self._policies: dict[str, Pending[PolicyRecord]] = {}
        self._spf: Pending[SpfOutcome] | None = None
        if authenticator._resolver is not None and authenticator.mode is not Mode.OFF:
            self._resolver: Resolver = authenticator._resolver
            identity = {"client_ip": client_ip, "helo": helo, "mail_from": mail_from}
            results = authenticator._spf_results
            known = cached_spf(self._resolver, results, **identity)
            if known is not None:
                self._spf = Pending.resolved(known)
            else:
                work = functools.partial(
                    evaluate_spf, self._resolver, authenticator._limiter, **identity
                )
                self._spf = Pending(nursery, work)

    @property
    def enabled(self) -> bool:
        return self._spf is not None

    def from_header_seen(self, value: str) -> None:
        """Start DMARC discovery for the author domains of a From field value.

        Optional and repeatable: ``verdict`` reads the From field from the message and
        starts whatever is missing.
        """
        if self.enabled:
            new = [d for d in author_domains([value]) if d not in self._policies]
            self._discover(new[: max(0, MAX_AUTHOR_DOMAINS - len(self._policies))])

    def _discover(self, domains: Iterable[str]) -> None:
        for domain in domains:
            if domain not in self._policies:
                known = discover_cached(self._resolver, domain)
                if known is not None:
                    self._policies[domain] = Pending.resolved(known)
                else:
                    work = functools.partial(discover, self._resolver, domain)
                    self._policies[domain] = Pending(self._nursery, work)

    def cancel(self) -> None:
        """Stop all background work of this transaction (RSET, refusal, disconnect)."""
        if self._spf is not None:
            self._spf.cancel()
        for pending in self._policies.values():
            pending.cancel()

    async def verdict(self, message: bytes) -> Verdict:
        """Verify DKIM, finish SPF and DMARC, decide; call at the end of data.

        ``message`` is the whole message as received (header and body, CRLF lines).
        """
        auth = self._auth
        if self._spf is None:
            return _unchecked(auth.authserv_id)
        inline = len(message) <= INLINE_DKIM_BYTES
        if inline:
            parsed = parse_message(message)
        else:
            parsed = await trio.to_thread.run_sync(parse_message, message, limiter=auth._limiter)
        domains = self._authors(parsed.from_values)
        try:
            dkim = await check_dkim(self._resolver, auth._limiter, parsed, inline=inline)
            return await self._conclude(dkim, domains)
        finally:
            self.cancel()

    async def verdict_verified(
        self, dkim: tuple[DkimOutcome, ...], from_values: tuple[str, ...]
    ) -> Verdict:
        """As :meth:`verdict`, for a message whose DKIM signatures were verified
        elsewhere (a large one, in a worker process: ``verify_standalone``)."""
        if self._spf is None:
            return _unchecked(self._auth.authserv_id)
        domains = self._authors(from_values)
        try:
            return await self._conclude(dkim, domains)
        finally:
            self.cancel()

    def _authors(self, from_values: tuple[str, ...]) -> tuple[str, ...]:
        domains = author_domains(list(from_values))[:MAX_AUTHOR_DOMAINS]
        self._discover(domains)
        return domains

    async def _conclude(self, dkim: tuple[DkimOutcome, ...], domains: tuple[str, ...]) -> Verdict:
        auth = self._auth
        assert self._spf is not None
        spf = await self._spf.result()
        records = [await self._policies[domain].result() for domain in domains]
        dmarc = tuple(evaluate(record, spf, dkim, auth._random) for record in records)
        refuse, reason = _decide(auth.settings, spf, dkim, dmarc)
        return Verdict(
            refuse=refuse,
            reason=reason,
            authentication_results=authentication_results(auth.authserv_id, spf, dkim, dmarc),
            spf=spf,
            dkim=dkim,
            dmarc=dmarc,
        )


def _unchecked(authserv_id: str) -> Verdict:
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id)
    return Verdict(refuse=False, reason="", authentication_results=str(header))


def _decide(
    settings: SenderAuthSettings,
    spf: SpfOutcome,
    dkim: tuple[DkimOutcome, ...],
    dmarc: tuple[DmarcOutcome, ...],
) -> tuple[bool, str]:
    """Issue 15: refuse only in enforce mode, only for a reject policy (after pct) or,
    when asked, an SPF ``fail`` of a domain without DMARC. Errors never refuse: a
    ``temperror`` of SPF or of any DKIM signature might have been the aligned pass."""
    if settings.mode is not Mode.ENFORCE:
        return False, ""
    if spf.result is Result.TEMPERROR or any(o.result is Result.TEMPERROR for o in dkim):
        return False, ""
    for outcome in dmarc:
        if outcome.result is Result.FAIL and outcome.disposition is Disposition.REJECT:
            return True, _reasons.dmarc_reject(outcome)
    no_record = all(o.result is Result.NONE for o in dmarc)
    if settings.reject_spf_fail and spf.result is Result.FAIL and no_record:
        return True, _reasons.spf_fail(spf)
    return False, ""
