"""The RFC 8601 ``Authentication-Results`` field for one message, built with authres.

authres renders result clauses, properties and quoting (RFC 8601 §2.2); this module
only chooses the properties: ``smtp.mailfrom``/``smtp.helo`` for SPF (§2.7.2),
``header.d``/``header.s``/``header.a`` per DKIM signature (RFC 6376 §7.7, RFC 7601
§2.7.1 registry), ``header.from`` and ``policy.dmarc`` for DMARC (RFC 7489 §11.2).
"""

from __future__ import annotations

import functools

import authres
import authres.dmarc

from ._results import DkimOutcome, DmarcOutcome, SpfOutcome

#: Rendered fields kept by their (immutable) outcomes: mail from one sender gets the same
#: results message after message, and rendering costs tens of microseconds.
FIELDS_CACHED = 1024


def _reason(text: str) -> str | None:
    return text[:200] or None


def _spf(outcome: SpfOutcome) -> object:
    address = {"smtp_helo": outcome.domain} if outcome.identity == "helo" else {}
    if not address:
        address = {"smtp_mailfrom": outcome.domain}
    return authres.SPFAuthenticationResult(
        result=outcome.result.value, reason=_reason(outcome.reason), **address
    )


def _dkim(outcome: DkimOutcome) -> object:
    return authres.DKIMAuthenticationResult(
        result=outcome.result.value,
        reason=_reason(outcome.reason),
        header_d=outcome.domain or None,
        header_s=outcome.selector or None,
        header_a=outcome.algorithm or None,
    )


def _dmarc(outcome: DmarcOutcome) -> object:
    comment = "sampled out by pct" if outcome.sampled_out else None
    return authres.dmarc.DMARCAuthenticationResult(
        result=outcome.result.value,
        result_comment=comment,
        reason=_reason(outcome.reason),
        header_from=outcome.domain,
        policy=outcome.disposition.value if outcome.published is not None else None,
    )


@functools.lru_cache(maxsize=FIELDS_CACHED)
def authentication_results(
    authserv_id: str,
    spf: SpfOutcome | None,
    dkim: tuple[DkimOutcome, ...],
    dmarc: tuple[DmarcOutcome, ...],
) -> str:
    """``Authentication-Results: <authserv-id>; spf=…; dkim=…; dmarc=…`` (one line).

    The arguments are frozen records, so equal outcomes share one rendering.
    """
    results: list[object] = []
    if spf is not None:
        results.append(_spf(spf))
    if dkim:
        results.extend(_dkim(outcome) for outcome in dkim)
    elif spf is not None:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    results.extend(_dmarc(outcome) for outcome in dmarc)
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header)
