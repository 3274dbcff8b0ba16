"""What each check found, as immutable records the session logs, counts and answers with.

Result names are RFC 8601 §2.7's, so they go into ``Authentication-Results`` unchanged
and make bounded metric labels.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs


class Result(enum.Enum):
    """RFC 8601 §2.7.1–§2.7.2 result values (and RFC 7489 §11.2 for DMARC)."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    POLICY = "policy"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class Disposition(enum.Enum):
    """RFC 7489 §6.3 policies: what the domain owner asks a receiver to do."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


@attrs.frozen(kw_only=True)
class SpfOutcome:
    """RFC 7208 result for the MAIL FROM identity (or HELO for the null sender, §2.4)."""

    result: Result
    #: ``mailfrom`` or ``helo`` (RFC 8601 §2.7.2 ``smtp.mailfrom`` / ``smtp.helo``).
    identity: str
    domain: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class DkimOutcome:
    """RFC 6376 §6.1 result for one DKIM-Signature field."""

    result: Result
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""


@attrs.frozen(kw_only=True)
class DmarcOutcome:
    """RFC 7489 §6.6 result for one author domain of the From header field."""

    result: Result
    #: The RFC5322.From domain evaluated.
    domain: str
    #: Where the record was found: the From domain or its organizational domain.
    record_domain: str = ""
    #: ``p=`` (or ``sp=`` for a subdomain) as published; None without a usable record.
    published: Disposition | None = None
    #: What applies after ``pct`` sampling (RFC 7489 §6.6.4); NONE on pass.
    disposition: Disposition = Disposition.NONE
    #: True when ``pct`` excluded this failing message from the published policy.
    sampled_out: bool = False
    reason: str = ""


@attrs.frozen(kw_only=True)
class Verdict:
    """Everything the session needs at the end of DATA.

    ``refuse`` is True only in ``enforce`` mode; ``reason`` is then the text for
    ``550 5.7.1``. ``authentication_results`` is one RFC 8601 header field, ready to log
    (or to prepend to the stored message).
    """

    refuse: bool
    reason: str
    authentication_results: str
    spf: SpfOutcome | None = None
    dkim: tuple[DkimOutcome, ...] = ()
    dmarc: tuple[DmarcOutcome, ...] = ()

    def by_mechanism(self) -> dict[str, str]:
        """One result per mechanism (``spf``, ``dkim``, ``dmarc``) for metric labels.

        With several DKIM signatures the best counts, as DMARC counts any aligned pass;
        with several author domains the worst DMARC result counts.
        """
        summary: dict[str, str] = {}
        if self.spf is not None:
            summary["spf"] = self.spf.result.value
        summary["dkim"] = _pick((o.result for o in self.dkim), _DKIM_ORDER).value
        summary["dmarc"] = _pick((o.result for o in self.dmarc), _DMARC_ORDER).value
        return summary


_DKIM_ORDER = (
    Result.PASS,
    Result.FAIL,
    Result.POLICY,
    Result.PERMERROR,
    Result.TEMPERROR,
    Result.NEUTRAL,
)
_DMARC_ORDER = (Result.FAIL, Result.TEMPERROR, Result.PERMERROR, Result.PASS)


def _pick(results: Iterable[Result], order: tuple[Result, ...]) -> Result:
    present = set(results)
    for result in order:
        if result in present:
            return result
    return Result.NONE
