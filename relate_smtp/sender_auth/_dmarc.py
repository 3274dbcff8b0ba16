"""DMARC (RFC 7489): policy discovery on Trio, evaluation by the ``dmarc`` package.

Discovery (§6.6.3) is DNS, so it is done here with the cached resolver and can start as
soon as the From header field is known: ``_dmarc.<From domain>``, and if that holds no
DMARC record, ``_dmarc.<organizational domain>``. A lookup that fails for DNS reasons
stops there with ``temperror``: a record may exist that would say otherwise.

The record syntax (§6.3, §6.4), identifier alignment (§3.1) and the choice between
``p=`` and ``sp=`` are the ``dmarc`` package's (``DMARCPolicy``, ``DMARC.get_result``).
Two rules are added around it:

- an authenticated identifier that is itself a public suffix is never aligned: the
  package's relaxed test would otherwise accept ``d=co.uk`` for ``example.co.uk``,
  while §3.2 makes alignment a matter of equal organizational domains;
- ``pct`` (§6.6.4) samples with the injected random source: a failing message left
  out of the sample gets the next policy down (reject → quarantine → none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import attrs
import dmarc

from ._domains import organizational_domain
from ._resolver import DnsAnswer, DnsTemporaryError, Resolver, txt_strings
from ._results import Disposition, DkimOutcome, DmarcOutcome, Result, SpfOutcome

#: Evaluations kept by their inputs (record, aligned-candidate domains): the same sender
#: passes the same way message after message.
JUDGEMENTS_CACHED = 1024

_LOWER = {
    Disposition.REJECT: Disposition.QUARANTINE,
    Disposition.QUARANTINE: Disposition.NONE,
    Disposition.NONE: Disposition.NONE,
}


@attrs.frozen(kw_only=True)
class PolicyRecord:
    """What discovery found for one author domain."""

    domain: str
    #: The DMARC record text, or None when no usable record was found.
    record: str | None = None
    #: The domain whose ``_dmarc`` name held the record.
    record_domain: str = ""
    #: ``none``, ``temperror`` or ``permerror`` when ``record`` is None.
    problem: Result = Result.NONE
    reason: str = ""

    @property
    def at_org_domain(self) -> bool:
        return bool(self.record) and self.record_domain != self.domain


def _dmarc_records(answer: DnsAnswer) -> list[str]:
    """§6.6.3 step 2: keep only records that begin with ``v=DMARC1``."""
    records = []
    for text in txt_strings(answer):
        value = text.decode("ascii", "replace").strip()
        tag = value.partition(";")[0]
        if tag.replace(" ", "").replace("\t", "") == "v=DMARC1":
            records.append(value)
    return records


def _candidates(domain: str) -> list[str]:
    """§6.6.3: the From domain, then its organizational domain."""
    org = organizational_domain(domain)
    return [domain, org] if org is not None and org != domain else [domain]


def _record_at(domain: str, candidate: str, answer: DnsAnswer) -> PolicyRecord | None:
    """What ``_dmarc.<candidate>`` says; None: no DMARC record there, look further."""
    records = _dmarc_records(answer)
    if len(records) > 1:
        # §6.6.3 step 5: more than one record means no DMARC processing.
        return PolicyRecord(
            domain=domain,
            record_domain=candidate,
            problem=Result.PERMERROR,
            reason="several DMARC records",
        )
    if records:
        return PolicyRecord(domain=domain, record=records[0], record_domain=candidate)
    return None


def _none_found(domain: str) -> PolicyRecord:
    return PolicyRecord(domain=domain, reason="no DMARC record")


def discover_cached(resolver: Resolver, domain: str) -> PolicyRecord | None:
    """``discover`` from cached answers only, on the event loop; None when one of the
    lookups it needs is not cached."""
    for candidate in _candidates(domain):
        answer = resolver.cached(f"_dmarc.{candidate}", "TXT")
        if answer is None:
            return None
        found = _record_at(domain, candidate, answer)
        if found is not None:
            return found
    return _none_found(domain)


async def discover(resolver: Resolver, domain: str) -> PolicyRecord:
    """§6.6.3: the record at the From domain, else at its organizational domain."""
    for candidate in _candidates(domain):
        try:
            answer = await resolver.lookup(f"_dmarc.{candidate}", "TXT")
        except DnsTemporaryError as exc:
            return PolicyRecord(domain=domain, problem=Result.TEMPERROR, reason=str(exc))
        found = _record_at(domain, candidate, answer)
        if found is not None:
            return found
    return _none_found(domain)


class _OrgDomains:
    """The ``publicsuffix`` object ``dmarc.DMARC`` asks for organizational domains."""

    def get_public_suffix(self, domain: str) -> str:
        return organizational_domain(domain) or domain


_ORG_DOMAINS = _OrgDomains()


def _usable(domain: str) -> bool:
    return bool(domain) and organizational_domain(domain) is not None


def evaluate(
    found: PolicyRecord,
    spf: SpfOutcome | None,
    dkim: tuple[DkimOutcome, ...],
    random: Callable[[], float],
) -> DmarcOutcome:
    """§6.6.2 and §6.6.4 for one author domain."""
    if found.record is None:
        return DmarcOutcome(
            result=found.problem,
            domain=found.domain,
            record_domain=found.record_domain,
            reason=found.reason,
        )
    spf_domain = None
    if spf is not None and spf.result is Result.PASS and _usable(spf.domain):
        spf_domain = spf.domain
    dkim_domains = tuple(
        outcome.domain
        for outcome in dkim
        if outcome.result is Result.PASS and _usable(outcome.domain)
    )
    judged, pct = _judge(found, spf_domain, dkim_domains)
    if judged.result is not Result.FAIL or judged.disposition is Disposition.NONE:
        return judged
    if random() * 100 < pct:
        return judged
    return attrs.evolve(judged, disposition=_LOWER[judged.disposition], sampled_out=True)


@functools.lru_cache(maxsize=JUDGEMENTS_CACHED)
def _judge(
    found: PolicyRecord, spf_domain: str | None, dkim_domains: tuple[str, ...]
) -> tuple[DmarcOutcome, int]:
    """The record's parse, alignment and policy choice: everything but the ``pct``
    sample, which is drawn for each message; a failure comes with its ``pct``."""
    assert found.record is not None
    try:
        policy = dmarc.DMARCPolicy(
            record=found.record,
            domain=found.domain,
            org_domain=found.record_domain if found.at_org_domain else None,
            publicsuffix=_ORG_DOMAINS,
            strict=False,
        )
    except dmarc.Error as exc:
        # §6.6.3 step 6: a record without a valid p= means no DMARC processing.
        error = DmarcOutcome(
            result=Result.PERMERROR,
            domain=found.domain,
            record_domain=found.record_domain,
            reason=f"bad DMARC record: {exc}",
        )
        return error, 0
    evaluated = policy.dmarc.get_result(
        policy.policy,
        auth_results=dmarc.AuthResults(
            spf=dmarc.SPF(spf_domain, dmarc.SPFResult.PASS) if spf_domain else None,
            dkim=[dmarc.DKIM(d, dmarc.DKIMResult.PASS) for d in dkim_domains] or None,
        ),
    )
    published = Disposition(
        (
            policy.policy.sp if found.at_org_domain and policy.policy.sp.value else policy.policy.p
        ).value
    )
    if evaluated.result is dmarc.DMARCResult.PASS:
        passed = DmarcOutcome(
            result=Result.PASS,
            domain=found.domain,
            record_domain=found.record_domain,
            published=published,
        )
        return passed, 100
    failed = DmarcOutcome(
        result=Result.FAIL,
        domain=found.domain,
        record_domain=found.record_domain,
        published=published,
        disposition=Disposition(evaluated.disposition.value),
        reason=f"no aligned SPF or DKIM pass for {found.domain}",
    )
    return failed, max(0, min(100, policy.policy.pct))
