"""The AUTH rate limiter through the running server, configured with the original's
TimeSpan keys (SPEC §2, §3).

The limiter is built from the loaded settings but reads a clock the test moves, so the
4 s lockout window and the backoffs are checked at their exact boundaries over real
sockets without waiting for them.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relate_smtp.handlers.ratelimit import RateLimiter
from relate_smtp.storage.sqlite import SqliteStore
from tests.e2e.helpers import SmtpLineClient, add_account, make_settings, running_server

ALICE = "alice@example.com"


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.start = self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> None:
        self.now = self.start + offset


async def auth(port: int, password: str) -> int:
    """One AUTH PLAIN as alice on a fresh connection; the reply code."""
    smtp = await SmtpLineClient.connect(port)
    try:
        assert (await smtp.reply())[0] == 220
        assert (await smtp.command("EHLO client.example"))[0] == 250
        token = base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode()
        code, text = await smtp.command(f"AUTH PLAIN {token}")
        if code == 454:
            assert text.startswith("4.7.0"), text
        return code
    finally:
        await smtp.aclose()


async def test_timespan_settings_drive_the_original_lockout(
    tmp_path: Path, store: SqliteStore
) -> None:
    account = await add_account(store, ALICE)
    settings = make_settings(
        tmp_path,
        "Security:RateLimit:MaxFailedAttempts=3",
        "Security:RateLimit:LockoutWindow=00:00:04",
        "Security:RateLimit:BaseBackoffDelay=00:00:01",
        "Security:RateLimit:MaxBackoffDelay=00:00:02",
    )
    clock = FakeClock()
    steps = [
        (0.0, "bad", 535),  # 1st failure: backoff 1 s
        (0.0, account.key, 454),  # blocked, even with the right key
        (0.999, account.key, 454),
        (1.0, "bad", 535),  # 2nd: backoff 2 s
        (2.999, "bad", 454),
        (3.0, "bad", 535),  # 3rd = Max: locked until first + 4 s (backoff says 5 s)
        (3.999, account.key, 454),
        (4.0, account.key, 235),  # the lockout is over and forgotten
    ]
    codes = []
    async with running_server(settings, store) as running:
        running.server.authenticator.rate_limiter = RateLimiter(
            settings.security.rate_limit, clock=clock
        )
        port = running.port("submission")
        for offset, password, _ in steps:
            clock.at(offset)
            codes.append(await auth(port, password))
    assert codes == [expected for _, _, expected in steps]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("Security:RateLimit:LockoutWindow=15m", "is not a TimeSpan"),
        ("Security:RateLimit:LockoutWindow=00:00:00", "is not a positive TimeSpan"),
        ("Security:RateLimit:MaxBackoffDelay=24:00", "is out of range for a TimeSpan"),
    ],
)
def test_a_bad_timespan_stops_start_up_naming_the_key(
    tmp_path: Path, override: str, fragment: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("Smtp__", "Security__"))}
    result = subprocess.run(
        [sys.executable, "-m", "relate_smtp", "serve", "--Smtp:Port=0", f"--{override}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    key, _, value = override.partition("=")
    assert result.returncode == 2
    assert f'{key}: "{value}" {fragment}' in result.stderr
    assert "Traceback" not in result.stderr
