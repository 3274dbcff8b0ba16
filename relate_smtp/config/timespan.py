"""Read .NET ``TimeSpan`` text as ``TimeSpan.Parse`` does with the invariant culture.

The original binds its ``TimeSpan`` options (``Security:RateLimit:LockoutWindow`` and the
backoff delays) with ``TimeSpan.Parse``, so a value written for it must mean the same
here, quirks included:

- ``[-][d.]hh:mm[:ss[.fffffff]]``, surrounding white space ignored;
- a bare integer is days (``"15"`` is 15 days, not 15 minutes);
- hours 0-23, minutes and seconds 0-59, days up to 10675199, else an error, except that
  three colon-separated numbers whose first is over 23 are read as days:hours:minutes
  (``"24:00:00"`` is 24 days). That comes from the invariant culture's own pattern
  ``d:h:mm:ss.FFFFFFF``, which also makes ``"1:02:03:04"`` 1 day 2 h 3 min 4 s;
- ``hh:mm:.f`` and ``d.hh:mm:.f`` (no seconds before the fraction) are accepted;
- a fraction has up to 7 digits, except that one starting with 0 may be longer and is
  rounded to 7 (``.00000005`` is one tick).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final

import attrs

__all__ = ["TICKS_PER_SECOND", "TimeSpanError", "format_timespan", "parse_timespan"]

TICKS_PER_SECOND: Final = 10_000_000

_MAX_DAYS: Final = 10_675_199
_MAX_HOURS: Final = 23
_MAX_MINUTES: Final = 59
_MAX_SECONDS: Final = 59
_FRACTION_DIGITS: Final = 7
_MAX_FRACTION: Final = 9_999_999
_MAX_TOKEN: Final = 0x0FFF_FFFF  # a longer number is an overflow, wherever it is
_MAX_NUMBERS: Final = 5
_MAX_MILLISECONDS: Final = (2**63 - 1) // 10_000
_MAX_TICKS: Final = 2**63 - 1

_DIGITS: Final = "0123456789"
_TOKEN: Final = re.compile(r"[0-9]+|[^0-9]+")

FORMAT_HINT: Final = "[-][d.]hh:mm[:ss[.fffffff]], e.g. 00:15:00; a bare number is days"
_RANGE_HINT: Final = "hours 0-23, minutes and seconds 0-59, days up to 10675199, 7 fraction digits"


class TimeSpanError(ValueError):
    """The text is not a TimeSpan; ``out_of_range`` when its form is right but a number
    is too large (.NET's OverflowException rather than FormatException)."""

    def __init__(self, message: str, *, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


@attrs.frozen
class _Number:
    value: int
    leading_zeroes: int = 0  # matters only to a fraction


_ZERO: Final = _Number(0)


@attrs.frozen
class _Literals:
    """The separators of one pattern .NET tries, in its order."""

    start: str
    day_hour: str
    negative: bool
    hour_minute: str = ":"
    minute_second: str = ":"
    second_fraction: str = "."
    end: str = ""


# Invariant ``[-][d.]hh:mm:ss.f`` first, then the invariant culture's ``[-]d:h:mm:ss.F``.
_PATTERNS: Final = (
    _Literals("", ".", negative=False),
    _Literals("-", ".", negative=True),
    _Literals("", ":", negative=False),
    _Literals("-", ":", negative=True),
)

# For each count of numbers, the shapes .NET tries in order: the separators (named as
# in _Literals; "app_compat" is minute_second + second_fraction) and the field each
# number fills.
_Shape = tuple[tuple[str, ...], tuple[str, ...]]
_SHAPES: Final[dict[int, tuple[_Shape, ...]]] = {
    1: ((("start", "end"), ("d",)),),
    2: ((("start", "hour_minute", "end"), ("h", "m")),),
    3: (
        (("start", "hour_minute", "minute_second", "end"), ("h", "m", "s")),
        (("start", "day_hour", "hour_minute", "end"), ("d", "h", "m")),
        (("start", "hour_minute", "app_compat", "end"), ("h", "m", "f")),
    ),
    4: (
        (("start", "hour_minute", "minute_second", "second_fraction", "end"), ("h", "m", "s", "f")),
        (("start", "day_hour", "hour_minute", "minute_second", "end"), ("d", "h", "m", "s")),
        (("start", "day_hour", "hour_minute", "app_compat", "end"), ("d", "h", "m", "f")),
    ),
    5: (
        (
            ("start", "day_hour", "hour_minute", "minute_second", "second_fraction", "end"),
            ("d", "h", "m", "s", "f"),
        ),
    ),
}


def parse_timespan(text: str) -> int:
    """The TimeSpan ``text`` denotes, in ticks of 100 ns; raises :class:`TimeSpanError`."""
    separators, numbers = _tokens(text.strip())
    matched = False
    for literals in _PATTERNS:
        for shape, fields in _SHAPES[len(numbers)]:
            if not _separators_match(separators, shape, literals):
                continue
            matched = True
            ticks = _ticks(dict(zip(fields, numbers, strict=True)), literals.negative)
            if ticks is not None:
                return ticks
    if matched:
        raise _out_of_range()
    raise _bad()


def format_timespan(seconds: float) -> str:
    """``seconds`` in TimeSpan's constant form (``[-][d.]hh:mm:ss[.fffffff]``), as the
    original's documentation writes a default such as ``00:15:00``."""
    ticks = round(seconds * TICKS_PER_SECOND)
    sign = "-" if ticks < 0 else ""
    whole, fraction = divmod(abs(ticks), TICKS_PER_SECOND)
    minutes, second = divmod(whole, 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    text = f"{sign}{f'{days}.' if days else ''}{hour:02}:{minute:02}:{second:02}"
    return f"{text}.{fraction:07}" if fraction else text


def _bad() -> TimeSpanError:
    return TimeSpanError(f"is not a TimeSpan ({FORMAT_HINT})")


def _out_of_range() -> TimeSpanError:
    return TimeSpanError(f"is out of range for a TimeSpan ({_RANGE_HINT})", out_of_range=True)


def _tokens(text: str) -> tuple[list[str], list[_Number]]:
    """Alternating separators and numbers, with an empty separator at either end that
    is a number, as .NET's tokenizer leaves them."""
    if not text:
        raise _bad()
    separators: list[str] = []
    numbers: list[_Number] = []
    for token in _TOKEN.findall(text):
        if token[0] not in _DIGITS:
            separators.append(token)
            continue
        if len(separators) == len(numbers):
            separators.append("")
        numbers.append(_number(token))
    if len(separators) == len(numbers):
        separators.append("")
    if not 1 <= len(numbers) <= _MAX_NUMBERS:
        raise _bad()
    return separators, numbers


def _number(digits: str) -> _Number:
    value = int(digits)
    if value > _MAX_TOKEN:
        raise _out_of_range()
    return _Number(value, len(digits) - len(digits.lstrip("0")))


def _separators_match(found: Sequence[str], shape: Sequence[str], literals: _Literals) -> bool:
    if len(found) != len(shape):
        return False
    return all(text == _literal(literals, name) for text, name in zip(found, shape, strict=True))


def _literal(literals: _Literals, name: str) -> str:
    if name == "app_compat":
        return literals.minute_second + literals.second_fraction
    text: str = getattr(literals, name)
    return text


def _ticks(fields: dict[str, _Number], negative: bool) -> int | None:
    """.NET's TryTimeToTicks: None when a component is out of range."""
    days, hours, minutes, seconds = (fields.get(name, _ZERO).value for name in "dhms")
    fraction = _fraction_ticks(fields.get("f", _ZERO))
    if (
        fraction is None
        or days > _MAX_DAYS
        or hours > _MAX_HOURS
        or minutes > _MAX_MINUTES
        or seconds > _MAX_SECONDS
    ):
        return None
    milliseconds = (days * 86_400 + hours * 3_600 + minutes * 60 + seconds) * 1_000
    if milliseconds > _MAX_MILLISECONDS:
        return None
    ticks = milliseconds * 10_000 + fraction
    # .NET wraps to TimeSpan.MinValue at exactly 2**63 when negating, and fails past it.
    if ticks > _MAX_TICKS + (1 if negative else 0):
        return None
    return -ticks if negative else ticks


def _fraction_ticks(fraction: _Number) -> int | None:
    """The fraction in ticks, normalised to 7 digits as .NET does; None if too long."""
    if fraction.value == 0:
        return 0
    if fraction.leading_zeroes == 0 and fraction.value > _MAX_FRACTION:
        return None
    digits = len(str(fraction.value)) + fraction.leading_zeroes
    scale: int = 10 ** abs(digits - _FRACTION_DIGITS)
    if digits <= _FRACTION_DIGITS:
        return fraction.value * scale
    # Math.Round(value / 10^k, MidpointRounding.AwayFromZero) on doubles.
    scaled = fraction.value / scale
    whole = math.floor(scaled)
    return whole + (1 if scaled - whole >= 0.5 else 0)
