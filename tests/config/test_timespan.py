"""``TimeSpan.Parse`` with the invariant culture, as the original binds its TimeSpans.

Expected values follow .NET's TimeSpanParse (the shapes it tries, in order) and the
examples of its documentation.
"""

from __future__ import annotations

import pytest

from relate_smtp.config.timespan import TICKS_PER_SECOND, TimeSpanError, parse_timespan

S = TICKS_PER_SECOND
DAY = 86_400 * S


@pytest.mark.parametrize(
    ("text", "ticks"),
    [
        ("0", 0),
        ("-0", 0),
        ("14", 14 * DAY),
        ("1:2:3", 3_723 * S),
        ("0:0:0.250", S // 4),
        ("10.20:30:40.50", 10 * DAY + 73_840 * S + S // 2),
        ("99.23:59:59.9999999", 100 * DAY - 1),
        ("0023:0059:0059.0099", 86_399 * S + 99_000),
        ("23:0:0", 82_800 * S),
        ("10:0", 36_000 * S),
        ("0:10", 600 * S),
        ("0.12:00", 43_200 * S),
        ("10.12:00", 10 * DAY + 43_200 * S),
        ("-00:00:01", -S),
        ("-1", -DAY),
        ("\t00:15:00\n", 900 * S),
        ("24:00:00", 24 * DAY),  # hours over 23: the invariant culture's d:h:m
        ("1:02:03:04", DAY + 7_384 * S),  # d:h:mm:ss
        ("1:02:03:04.5", DAY + 7_384 * S + S // 2),
        ("00:00:.5", S // 2),  # h:m:.f
        ("1.00:00:.5", DAY + S // 2),  # d.h:m:.f
        ("0:0:0.00000005", 1),  # a fraction starting with 0 is rounded to 7 digits
        ("0:0:0.01234567", 123_457),
        ("0:0:0.00000004", 0),
        ("10675199.02:48:05.4775807", 2**63 - 1),
        ("-10675199.02:48:05.4775808", -(2**63)),
    ],
)
def test_parses_as_dotnet(text: str, ticks: int) -> None:
    assert parse_timespan(text) == ticks


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "10:",
        ":10",
        ".123",
        "10.",
        "10.12",
        "1.2.3",
        "+1",
        "- 1",
        "1e3",
        "15m",
        "1:2:3:4:5:6",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(TimeSpanError, match="is not a TimeSpan") as caught:
        parse_timespan(text)
    assert not caught.value.out_of_range


@pytest.mark.parametrize(
    "text",
    [
        "24:0",  # two numbers are h:m, and hours stop at 23
        "0:60:0",
        "0:0:60",
        "1.24:00:00",
        "10675200",
        "00:00:00.12345678",  # 8 digits not starting with 0
        "268435456",  # longer than .NET's tokenizer takes
        "10675199.02:48:05.4775808",
    ],
)
def test_out_of_range(text: str) -> None:
    with pytest.raises(TimeSpanError, match="is out of range") as caught:
        parse_timespan(text)
    assert caught.value.out_of_range
