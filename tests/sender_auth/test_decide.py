"""The refusal rule: only enforce, only a reject policy after pct, never on DNS trouble."""

from __future__ import annotations

import pytest

from relate_smtp.sender_auth import (
    Disposition,
    DkimOutcome,
    DmarcOutcome,
    Mode,
    Result,
    SenderAuthSettings,
    SpfOutcome,
)
from relate_smtp.sender_auth._check import _decide

ENFORCE = SenderAuthSettings(mode=Mode.ENFORCE)
SPF_FAIL = SpfOutcome(result=Result.FAIL, identity="mailfrom", domain="bank.example")
REJECTED = DmarcOutcome(
    result=Result.FAIL,
    domain="bank.example",
    published=Disposition.REJECT,
    disposition=Disposition.REJECT,
)


def test_a_dmarc_reject_failure_is_refused_in_enforce() -> None:
    refuse, reason = _decide(ENFORCE, SPF_FAIL, (), (REJECTED,))
    assert refuse and reason


def test_observe_never_refuses() -> None:
    assert _decide(SenderAuthSettings(), SPF_FAIL, (), (REJECTED,)) == (False, "")


@pytest.mark.parametrize(
    ("spf", "dkim"),
    [
        (SPF_FAIL, (DkimOutcome(result=Result.TEMPERROR, domain="bank.example"),)),
        (SPF_FAIL, (DkimOutcome(result=Result.TEMPERROR, reason="message too large"),)),
        (SpfOutcome(result=Result.TEMPERROR, identity="mailfrom", domain="bank.example"), ()),
    ],
)
def test_a_temporary_error_that_might_have_passed_never_refuses(
    spf: SpfOutcome, dkim: tuple[DkimOutcome, ...]
) -> None:
    assert _decide(ENFORCE, spf, dkim, (REJECTED,)) == (False, "")
