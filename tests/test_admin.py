"""What the administrative commands print of sender-controlled text."""

from __future__ import annotations

from relate_smtp.admin import _safe


def test_escape_sequences_never_reach_the_terminal() -> None:
    assert _safe("Hi \x1b[2J\x9b31m there\x07") == "Hi \ufffd[2J\ufffd31m there\ufffd"


def test_line_breaks_survive_only_where_asked() -> None:
    assert _safe("one\r\ntwo\tthree") == "one two\tthree"
    assert _safe("one\r\ntwo", multiline=True) == "one\ntwo"
