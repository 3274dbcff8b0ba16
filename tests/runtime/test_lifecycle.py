"""The ``Listening:`` lines scripts and tests parse: IPv6 hosts in brackets."""

from __future__ import annotations

import logging

import pytest

from relate_smtp.runtime.lifecycle import log_bound
from relate_smtp.runtime.listeners import BoundListener
from tests.e2e.helpers import LISTENING


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("::", "[::]:2525"),  # RFC 3986 §3.2.2: an IPv6 literal is bracketed before a port
        ("2001:db8::1", "[2001:db8::1]:2525"),
        ("0.0.0.0", "0.0.0.0:2525"),
        ("127.0.0.1", "127.0.0.1:2525"),
    ],
)
def test_listening_line_brackets_ipv6_hosts(
    caplog: pytest.LogCaptureFixture, host: str, shown: str
) -> None:
    with caplog.at_level(logging.INFO, logger="relate_smtp.lifecycle"):
        log_bound([BoundListener(name="submission", host=host, port=2525, tls="starttls")])
    [message] = [r.getMessage() for r in caplog.records]
    assert message == f"Listening: submission on {shown} (starttls)"
    match = LISTENING.search(message)
    assert match is not None
    assert match.groups() == ("submission", shown.rsplit(":", 1)[0], "2525", "starttls")
