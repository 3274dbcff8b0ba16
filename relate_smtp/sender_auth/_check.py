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
from ._dmarc import PolicyRecord, discover, evaluate
from ._domains import author_domains, organizational_domain
from ._pending import Pending
from ._report import authentication_results
from ._resolver import Resolver
from ._results import Disposition, DmarcOutcome, Result, SpfOutcome, Verdict
from ._settings import Mode, SenderAuthSettings
from ._spf import check_spf

#: Worker threads for pyspf evaluations and DKIM parsing/crypto at once. A pyspf thread
#: mostly waits for DNS answered on Trio, so this is sized for concurrent transactions,
#: not for cores.
WORKER_THREADS = 32
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
            self._spf = Pending(
                nursery,
                functools.partial(
                    check_spf,
                    self._resolver,
                    authenticator._limiter,
                    client_ip=client_ip,
                    helo=helo,
                    mail_from=mail_from,
                ),
            )

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
                self._policies[domain] = Pending(
                    self._nursery, functools.partial(discover, self._resolver, domain)
                )

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
            header = authres.AuthenticationResultsHeader(authserv_id=auth.authserv_id)
            return Verdict(refuse=False, reason="", authentication_results=str(header))
        parsed = await trio.to_thread.run_sync(parse_message, message, limiter=auth._limiter)
        domains = author_domains(list(parsed.from_values))[:MAX_AUTHOR_DOMAINS]
        self._discover(domains)
        try:
            dkim = await check_dkim(self._resolver, auth._limiter, parsed)
            spf = await self._spf.result()
            records = [await self._policies[domain].result() for domain in domains]
        finally:
            self.cancel()
        dmarc = tuple(evaluate(record, spf, dkim, auth._random) for record in records)
        refuse, reason = _decide(auth.settings, spf, dmarc)
        return Verdict(
            refuse=refuse,
            reason=reason,
            authentication_results=authentication_results(auth.authserv_id, spf, dkim, dmarc),
            spf=spf,
            dkim=dkim,
            dmarc=dmarc,
        )


def _decide(
    settings: SenderAuthSettings, spf: SpfOutcome, dmarc: tuple[DmarcOutcome, ...]
) -> tuple[bool, str]:
    """Issue 15: refuse only in enforce mode, only for a reject policy (after pct) or,
    when asked, an SPF ``fail`` of a domain without DMARC. Errors never refuse."""
    if settings.mode is not Mode.ENFORCE:
        return False, ""
    for outcome in dmarc:
        if outcome.result is Result.FAIL and outcome.disposition is Disposition.REJECT:
            return True, _reasons.dmarc_reject(outcome)
    no_record = all(o.result is Result.NONE for o in dmarc)
    if settings.reject_spf_fail and spf.result is Result.FAIL and no_record:
        return True, _reasons.spf_fail(spf)
    return False, ""
