"""Every text a refusal carries, in one place (the session wraps it in ``550 5.7.1``)."""

from __future__ import annotations

from ._results import DmarcOutcome, SpfOutcome


def dmarc_reject(outcome: DmarcOutcome) -> str:
    """RFC 7489 §6.6.4 / §7.3 style: name the policy domain and the failure."""
    return (
        f"Message rejected by the DMARC policy of {outcome.record_domain}: "
        f"no aligned SPF or DKIM authentication for {outcome.domain}"
    )


def spf_fail(outcome: SpfOutcome) -> str:
    """RFC 7208 §8.4: a ``fail`` refusal names the domain that did not authorise."""
    return f"SPF check failed: {outcome.domain} does not authorise this client"
