"""The hostile-input corpus against the real server over sockets (``corpus.CASES``).

For every case, on a fresh server with short clocks: the case's own checks pass (a
defined reply, or a close within its timeout); a normal client sends a message while
the hostile input is in flight and another after it; the server logs no error and no
traceback, exactly one summary line per hostile connection and at most one more line
about it; and the store holds exactly what it should (no smuggled message, nothing from
a cut session, every normal message once).
"""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest
import trio

from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import make_settings, running_server
from tests.robustness.corpus import CASES, CORPUS_SETTINGS, SLACK, Case, Target
from tests.robustness.helpers import (
    SUMMARY,
    CommitRecorder,
    Ledger,
    account,
    capture_logs,
    normal_session,
    sqlite_stored,
)

CASE_TIMEOUT = 40.0


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
        )
        for case in CASES
    ],
)
async def test_hostile_input(
    case: Case,
    tmp_path: Path,
    db_path: Path,
    store: SqliteStore,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    ledger = Ledger()
    settings = make_settings(tmp_path, *CORPUS_SETTINGS)
    started = time.monotonic()
    with capture_logs() as logs, trio.fail_after(CASE_TIMEOUT):
        async with running_server(
            settings, store, tls_context=server_tls, new_mail_listener=CommitRecorder(ledger)
        ) as running:
            port = running.port("submission")
            first = len(logs.records)
            in_flight = trio.Event()
            target = Target(port=port, client_tls=client_tls, in_flight=in_flight.set)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(case.run, target)
                await in_flight.wait()
                await normal_session(port, ledger)  # served while the attack goes on
            await normal_session(port, ledger)  # and after it
            await logs.sessions_ended(target.ports, timeout=SLACK)
            during = [r.getMessage() for r in logs.records[first:]]
    elapsed = time.monotonic() - started

    assert logs.problems() == []
    normal_ports = _normal_ports(during, target.ports)
    for hostile in target.ports:
        (summary,) = logs.summaries(hostile)
        assert re.search(rf"outcome=({case.outcome})$", summary), summary
    # One line per routine event: the summary, and at most one more per connection.
    about_others = [m for m in during if not any(f":{p} " in m for p in normal_ports)]
    assert len(about_others) <= 2 * len(target.ports), about_others

    stored, orphans = sqlite_stored(str(db_path))
    assert orphans == 0
    accounting = account(ledger, stored)
    assert accounting.accepted == 2  # the normal sessions; hostile ones are in `expected`
    for message_id, copies in target.expected:
        assert len(stored.get(message_id, [])) == copies, message_id
    allowed = set(ledger.told) | {m for m, _ in target.expected}
    assert set(stored) <= allowed, sorted(set(stored) - allowed)
    assert elapsed < CASE_TIMEOUT


def _normal_ports(messages: list[str], hostile: list[int]) -> set[int]:
    ports = set()
    for message in messages:
        if SUMMARY.match(message):
            port = int(message.split()[1].rsplit(":", 1)[1])
            if port not in hostile:
                ports.add(port)
    return ports
