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

from collections.abc import Callable

import attrs
import dmarc

from ._domains import organizational_domain
from ._resolver import DnsAnswer, DnsTemporaryError, Resolver, txt_strings
from ._results import Disposition, DkimOutcome, DmarcOutcome, Result, SpfOutcome

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


async def discover(resolver: Resolver, domain: str) -> PolicyRecord:
    """§6.6.3: the record at the From domain, else at its organizational domain."""
    candidates = [domain]
    org = organizational_domain(domain)
    if org is not None and org != domain:
        candidates.append(org)
    for candidate in candidates:
        try:
            answer = await resolver.lookup(f"_dmarc.{candidate}", "TXT")
        except DnsTemporaryError as exc:
            return PolicyRecord(domain=domain, problem=Result.TEMPERROR, reason=str(exc))
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
    return PolicyRecord(domain=domain, reason="no DMARC record")


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
        return DmarcOutcome(
            result=Result.PERMERROR,
            domain=found.domain,
            record_domain=found.record_domain,
            reason=f"bad DMARC record: {exc}",
        )
    results: list[dmarc.AuthResult] = []
    if spf is not None and spf.result is Result.PASS and _usable(spf.domain):
        results.append(dmarc.SPF(spf.domain, dmarc.SPFResult.PASS))
    results.extend(
        dmarc.DKIM(outcome.domain, dmarc.DKIMResult.PASS)
        for outcome in dkim
        if outcome.result is Result.PASS and _usable(outcome.domain)
    )
    spf_results = [r for r in results if isinstance(r, dmarc.SPF)]
    evaluated = policy.dmarc.get_result(
        policy.policy,
        auth_results=dmarc.AuthResults(
            spf=spf_results[0] if spf_results else None,
            dkim=[r for r in results if isinstance(r, dmarc.DKIM)] or None,
        ),
    )
    published = Disposition(
        (
            policy.policy.sp if found.at_org_domain and policy.policy.sp.value else policy.policy.p
        ).value
    )
    if evaluated.result is dmarc.DMARCResult.PASS:
        return DmarcOutcome(
            result=Result.PASS,
            domain=found.domain,
            record_domain=found.record_domain,
            published=published,
        )
    disposition = Disposition(evaluated.disposition.value)
    pct = max(0, min(100, policy.policy.pct))
    sampled_out = disposition is not Disposition.NONE and not random() * 100 < pct
    if sampled_out:
        disposition = _LOWER[disposition]
    return DmarcOutcome(
        result=Result.FAIL,
        domain=found.domain,
        record_domain=found.record_domain,
        published=published,
        disposition=disposition,
        sampled_out=sampled_out,
        reason=f"no aligned SPF or DKIM pass for {found.domain}",
    )
