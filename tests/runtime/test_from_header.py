"""The From field found as a message streams in (issue 15: DMARC starts mid-body)."""

from __future__ import annotations

import pytest

from relate_smtp.runtime.from_header import FromHeaderScanner

HEADER = (
    b'Received: from x\r\n by y\r\nfROM: "Bank"\r\n <security@bank.example>\r\n'
    b"Subject: hi\r\n\r\nFrom: body@elsewhere.example\r\n"
)


def scan(*chunks: bytes, limit: int = 100_000) -> list[tuple[int, str]]:
    """(index of the chunk that completed it, value) for each value the scanner gave."""
    scanner = FromHeaderScanner(limit)
    return [
        (index, value)
        for index, chunk in enumerate(chunks)
        if (value := scanner.feed(chunk)) is not None
    ]


def test_a_folded_field_is_unfolded_once_the_next_field_starts() -> None:
    assert scan(HEADER) == [(0, '"Bank" <security@bank.example>')]


@pytest.mark.parametrize("split", range(1, len(HEADER)))
def test_any_split_of_the_chunks_gives_the_same_value(split: int) -> None:
    [(_, value)] = scan(HEADER[:split], HEADER[split:])
    assert value == '"Bank" <security@bank.example>'


def test_the_value_is_given_as_soon_as_the_field_is_complete() -> None:
    found = scan(b"From: a@b.example\r\n", b"To: c@d.example\r\n", b"\r\nbody")
    assert found == [(1, "a@b.example")]


def test_the_blank_line_completes_a_last_field() -> None:
    assert scan(b"Subject: x\r\nFrom: a@b.example\r\n\r\n") == [(0, "a@b.example")]


def test_the_body_is_never_searched() -> None:
    assert scan(b"Subject: x\r\n\r\nFrom: a@b.example\r\nTo: y\r\n") == []


def test_nothing_is_searched_past_the_limit() -> None:
    padding = b"X-Pad: " + b"p" * 200 + b"\r\n"
    scanner = FromHeaderScanner(100)
    assert scanner.feed(padding + b"From: a@b.example\r\nTo: c\r\n") is None
    assert scanner.done


def test_a_field_cut_by_the_limit_is_not_given() -> None:
    scanner = FromHeaderScanner(30)
    assert scanner.feed(b"From: someone.with.a.long.name@b.example\r\nTo: c\r\n") is None
    assert scanner.done


def test_bare_line_feeds_and_eight_bit_text_are_read() -> None:
    assert scan("From: Jörg <j@münchen.example>\nTo: x\n".encode()) == [
        (0, "Jörg <j@münchen.example>")
    ]
