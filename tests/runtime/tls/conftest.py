"""Fixtures of the TLS tests: a fresh test CA per test and a leaf it issued."""

from __future__ import annotations

import pytest
import trustme

from tests.runtime.tls.helpers import Leaf, issue


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def leaf(ca: trustme.CA) -> Leaf:
    return issue(ca)
