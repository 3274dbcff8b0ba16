"""How both stores make a message's values fit their columns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from relate_smtp.storage.records import EMAIL_ADDRESS_MAX, SUBJECT_MAX
from relate_smtp.storage.values import bare_message_id, clean_text, normalise_email
from tests.storage.helpers import new_email, to


@pytest.mark.parametrize(
    ("value", "bare"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("<>", None),
        ("< >", None),
        ("abc@x", "abc@x"),
        ("<abc@x>", "abc@x"),
        (" <abc@x> ", "abc@x"),
        ("< abc@x >", "abc@x"),
        ("<abc@x", "abc@x"),
        ("abc@x>", "abc@x"),
    ],
)
def test_bare_message_id(value: str | None, bare: str | None) -> None:
    assert bare_message_id(value) == bare


@pytest.mark.parametrize(
    ("value", "clean"),
    [(None, None), ("plain", "plain"), ("a\x00b", "ab"), ("é\ud800", "é\ufffd")],
)
def test_clean_text(value: str | None, clean: str | None) -> None:
    assert clean_text(value) == clean


def test_normalise_email_clips_cleans_and_keeps_the_instant() -> None:
    when = datetime(2024, 1, 1, 6, 0, tzinfo=timezone(timedelta(hours=5)))
    email = new_email(
        subject="\x00" + "s" * SUBJECT_MAX + "tail",
        received_at=when,
        header_recipients=(to("a" * (EMAIL_ADDRESS_MAX + 5), "N\x00"),),
        envelope_recipients=("b" * (EMAIL_ADDRESS_MAX + 1),),
    )

    got = normalise_email(email)

    assert got.subject == "s" * SUBJECT_MAX
    assert got.received_at == datetime(2024, 1, 1, 1, 0, tzinfo=UTC) == when
    assert got.header_recipients[0].address == "a" * EMAIL_ADDRESS_MAX
    assert got.header_recipients[0].display_name == "N"
    assert got.envelope_recipients == ("b" * EMAIL_ADDRESS_MAX,)
    assert normalise_email(got) == got
