"""The fuzz target under hypothesis: arbitrary bytes never break the core.

``RELATE_SMTP_FUZZ_EXAMPLES`` sets how many inputs each test tries (300 by default;
``nox -s fuzz`` runs 200000). The seeds in ``fuzz/corpus/`` always run as examples.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_server import CORPUS, TOKENS, check_output, fuzz_one, mutate, run_one, split_reads
from relate_smtp.protocol import State

EXAMPLES: Final = int(os.environ.get("RELATE_SMTP_FUZZ_EXAMPLES", "300"))
SEEDS: Final = sorted(p for p in CORPUS.iterdir() if p.is_file())

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Test = Callable[[bytes], None]


def with_corpus(test: Test) -> Test:
    """Add every corpus seed as an explicit example."""
    for path in SEEDS:
        test = example(path.read_bytes())(test)
    return test


@fuzz_settings
@with_corpus
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    fuzz_one(data)


#: A header, then SMTP-shaped pieces mixed with noise: random bytes rarely get past EHLO.
smtp_shaped = st.tuples(
    st.binary(min_size=3, max_size=3),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=16)), max_size=60),
).map(lambda parts: parts[0] + b"".join(parts[1]))


@fuzz_settings
@with_corpus
@given(smtp_shaped)
def test_smtp_shaped_bytes(data: bytes) -> None:
    fuzz_one(data)


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_corpus_seed_runs_clean(path: Path) -> None:
    report = run_one(path.read_bytes())
    assert report.final_state is State.CLOSED
    assert report.replies > 1


def test_corpus_seeds_reach_what_they_are_for() -> None:
    reports = {path.name: run_one(path.read_bytes()) for path in SEEDS}
    assert reports["session-data"].events["MessageEnd"] == 1
    assert reports["bdat"].events["MessageEnd"] == 1
    assert reports["starttls"].handshakes == 1
    assert reports["auth-login"].events["AuthRequest"] == 2
    assert reports["smuggling-reject"].events["MessageAborted"] == 1
    assert reports["smuggling-normalize"].events["MessageEnd"] == 1
    assert reports["limits"].events["MessageAborted"] == 1
    assert reports["limits"].events["Quit"] == 0  # closed for too many errors first


def test_reads_keep_every_byte() -> None:
    stream = b"EHLO x\r\nNOOP\r\nQU"
    assert split_reads(stream, ord("\n")) == [b"EHLO x\r\n", b"NOOP\r\n", b"QU"]
    assert b"".join(split_reads(stream, ord("O"))) == stream
    assert split_reads(stream, None) == [stream]


@pytest.mark.parametrize(
    ("out", "read"),
    [
        (b"250 OK", b"NOOP\r\n"),  # no CRLF
        (b"hello\r\n", b"NOOP\r\n"),  # not a reply
        (b"250 OK\r\n" * 5, b"NOOP\r\n"),  # more replies than one line can cause
    ],
)
def test_output_checks_catch_bad_output(out: bytes, read: bytes) -> None:
    with pytest.raises(AssertionError):
        check_output(out, read)


def test_mutation_is_deterministic_and_bounded() -> None:
    seeds = [path.read_bytes() for path in SEEDS]
    first = [mutate(s, seeds, random.Random(7)) for s in seeds]
    again = [mutate(s, seeds, random.Random(7)) for s in seeds]
    assert first == again
    assert all(len(m) <= 65536 for m in first)
