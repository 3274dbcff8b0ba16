"""Per-client-IP limits on failed AUTH attempts (SPEC §3, ``Security:RateLimit:*``).

Two rules, both counted from an IP's failures only:

- Backoff: after the n-th failure the IP must wait ``base * 2**(n-1)`` seconds, capped
  at ``max``, before its next attempt.
- Lockout: once ``MaxFailedAttempts`` failures fall within one window, the IP is refused
  until the window ends. The window opens at the first failure and lasts
  ``LockoutWindowMinutes``; a failure after it closes opens a new window.

An attempt refused by either rule is not counted (the caller never reaches the
database), so a client hammering a blocked server does not extend its own sentence.
Success forgets the IP. ``MaxFailedAttempts`` of 0 or less turns the lockout off and
leaves the backoff.

The state lives in this process only; with several hosts each keeps its own (SPEC §3,
§10: nothing kept in memory is needed for correctness).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import attrs

from relate_smtp.config import RateLimitSettings

__all__ = ["DEFAULT_MAX_TRACKED_IPS", "RateLimiter"]

# Enough for any real population of clients with recent failures, small enough (a few
# tens of MB at worst) that a scan from many addresses cannot exhaust memory.
DEFAULT_MAX_TRACKED_IPS = 100_000


@attrs.define
class _Failures:
    count: int
    window_start: float
    last_failure: float
    expires_at: float


class RateLimiter:
    """Tracks failed AUTH attempts per client IP and says who must wait.

    ``clock`` returns monotonic seconds; tests pass a fake one. Memory is bounded: an
    entry is dropped once neither rule can block its IP any more, and beyond
    ``max_tracked_ips`` the IP whose last failure is oldest is forgotten first.
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked_ips: int = DEFAULT_MAX_TRACKED_IPS,
    ) -> None:
        if max_tracked_ips < 1:
            raise ValueError("max_tracked_ips must be at least 1")
        self._max_failures = settings.max_failed_attempts
        self._window = settings.lockout_window_minutes * 60.0
        self._base_delay = settings.base_backoff_delay_seconds
        self._max_delay = settings.max_backoff_delay_seconds
        self._clock = clock
        self._max_tracked = max_tracked_ips
        # Ordered by last failure, oldest first: the eviction order under pressure, and
        # close enough to expiry order for the cheap sweep in _sweep.
        self._entries: OrderedDict[str, _Failures] = OrderedDict()
        # Verifications under way per IP (bounded by the connections that exist).
        self._pending: dict[str, int] = {}

    def __len__(self) -> int:
        """How many IPs are currently tracked."""
        return len(self._entries)

    def backoff_delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure: ``base * 2**(failures-1)``, capped."""
        if failures < 1:
            return 0.0
        # Cap the exponent first: 2**n for a large n is a huge int, and the cap is
        # reached long before anyway.
        exponent = min(failures - 1, 64)
        return float(min(self._base_delay * 2.0**exponent, self._max_delay))

    def retry_after(self, ip: str) -> float | None:
        """Seconds until ``ip`` may try again, or None when it may try now."""
        entry = self._entries.get(ip)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            del self._entries[ip]
            return None
        until = entry.last_failure + self.backoff_delay(entry.count)
        if self._locked_out(entry, now):
            until = max(until, entry.window_start + self._window)
        return until - now if until > now else None

    def reserve(self, ip: str) -> bool:
        """Claim a verification slot for ``ip``; False when the failures it has plus the
        verifications it already has under way could reach the lockout. Without this,
        attempts sent in parallel would all pass :meth:`retry_after` before the first
        failure is recorded. Pair every True with :meth:`release`."""
        pending = self._pending.get(ip, 0)
        if self._max_failures > 0:
            entry = self._entries.get(ip)
            failures = entry.count if entry is not None else 0
            if failures + pending >= self._max_failures:
                return False
        self._pending[ip] = pending + 1
        return True

    def release(self, ip: str) -> None:
        """End a verification claimed with :meth:`reserve`."""
        pending = self._pending.get(ip, 0) - 1
        if pending > 0:
            self._pending[ip] = pending
        else:
            self._pending.pop(ip, None)

    def record_failure(self, ip: str) -> None:
        """Count a failed attempt (a wrong key or unknown user, not a blocked attempt)."""
        now = self._clock()
        entry = self._entries.pop(ip, None)
        if entry is None or now >= entry.window_start + self._window:
            entry = _Failures(count=1, window_start=now, last_failure=now, expires_at=now)
        else:
            entry.count += 1
            entry.last_failure = now
        entry.expires_at = max(
            entry.window_start + self._window, now + self.backoff_delay(entry.count)
        )
        self._entries[ip] = entry
        self._sweep(now)

    def record_success(self, ip: str) -> None:
        """Forget the IP's failures: a client that proves it holds a key is not an attacker."""
        self._entries.pop(ip, None)

    def _locked_out(self, entry: _Failures, now: float) -> bool:
        return (
            self._max_failures > 0
            and entry.count >= self._max_failures
            and now < entry.window_start + self._window
        )

    def _sweep(self, now: float) -> None:
        """Drop expired entries from the old end, then enforce the size cap.

        Stopping at the first live entry keeps each call O(1) amortised; an expired entry
        stuck behind a live one is removed when its IP next asks, or by the cap.
        """
        while self._entries:
            ip, oldest = next(iter(self._entries.items()))
            if now < oldest.expires_at:
                break
            del self._entries[ip]
        while len(self._entries) > self._max_tracked:
            self._entries.popitem(last=False)
