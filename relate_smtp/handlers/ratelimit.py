"""Per-client limits on failed AUTH attempts (SPEC §3, ``Security:RateLimit:*``).

A client is its :func:`~relate_smtp.addresses.client_group`: an IPv4 address,
or an IPv6 prefix (a /64 by default, ``Smtp:ClientIpv6PrefixLength``), since one IPv6
host can take any address of its prefix and would otherwise get a fresh allowance per
address. Below, "IP" means that group.

The arithmetic is the original's ``AuthenticationRateLimiter.CheckRateLimit`` (SPEC §3).
An IP's entry holds its failure count n, its first and its last failure, and expires
``LockoutWindow`` after the last failure (each failure renews it; the first and the
count stay):

- Lockout: while n >= ``MaxFailedAttempts`` the IP is refused until first failure +
  ``LockoutWindow``; at that moment the entry is forgotten, whatever the backoff says.
  Failures spaced so that the entry never expires keep adding up, but once the window
  from the first has passed reaching the limit forgets the entry instead of locking.
- Backoff: otherwise, after n > 0 failures the IP waits until last failure +
  ``min(BaseBackoffDelay * 2**(n-1), MaxBackoffDelay)``; a delay of zero or less
  means no wait.

``MaxFailedAttempts`` of 1 or less locks at the first failure, as in the original (an
entry only exists once there is a failure). An attempt refused by either rule is not
counted (the caller never reaches the database), so a client hammering a blocked server
does not extend its own sentence.

What a success clears is a deliberate difference from the original, which forgets the
whole IP on any success (docs/compatibility.md). Each failure counts in the IP's one
bucket, which both rules read, and is also noted against the login it tried (the
username, lower-cased as logins are matched). A success removes from the count only
the failures noted against its own login; the times of the first and the last failure
stay. A client that mistypes its key and then gets it right is cleared as before, but
an attacker cannot launder guesses at alice by logging in to an account of its own
between them: those guesses stay counted until the entry expires or the lockout ends.
Failures at more than :data:`MAX_LOGINS_PER_IP` distinct logins in one entry are noted
against none, so no success clears them; that also bounds the size of an entry.

The state lives in this process only; with several hosts each keeps its own (SPEC §3,
§10: nothing kept in memory is needed for correctness).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import attrs

from relate_smtp.addresses import client_group
from relate_smtp.config import RateLimitSettings, SmtpSettings

__all__ = ["DEFAULT_MAX_TRACKED_IPS", "MAX_LOGINS_PER_IP", "RateLimiter"]

# Enough for any real population of clients with recent failures, small enough (about
# 50 MB, under 100 MB at worst) that a scan from many addresses cannot exhaust memory.
DEFAULT_MAX_TRACKED_IPS = 100_000

# Distinct logins whose failures one IP's entry tells apart. A real client uses one or
# two; a client spraying many is locked out after MaxFailedAttempts (5 by default)
# whatever this is.
MAX_LOGINS_PER_IP = 4

_DEFAULT_IPV6_PREFIX_LENGTH = SmtpSettings().client_ipv6_prefix_length


def _login_key(username: str) -> bytes:
    """A fixed-size stand-in for a login, as a SASL username can be kilobytes long."""
    login = username.lower().encode("utf-8", "surrogatepass")
    return hashlib.blake2b(login, digest_size=16).digest()


@attrs.define
class _Failures:
    count: int
    first_failure: float
    last_failure: float
    expires_at: float
    # The part of ``count`` that a success at each login clears.
    by_login: dict[bytes, int] = attrs.Factory(dict)

    def note(self, username: str) -> None:
        login = _login_key(username)
        if login in self.by_login or len(self.by_login) < MAX_LOGINS_PER_IP:
            self.by_login[login] = self.by_login.get(login, 0) + 1


class RateLimiter:
    """Tracks failed AUTH attempts per client and says who must wait.

    Every method takes the client's address and groups it with ``ipv6_prefix_length``.
    ``clock`` returns monotonic seconds; tests pass a fake one. Memory is bounded: an
    entry is dropped when it expires or its lockout ends, and beyond
    ``max_tracked_ips`` the IP whose last failure is oldest is forgotten first.
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked_ips: int = DEFAULT_MAX_TRACKED_IPS,
        ipv6_prefix_length: int = _DEFAULT_IPV6_PREFIX_LENGTH,
    ) -> None:
        if max_tracked_ips < 1:
            raise ValueError("max_tracked_ips must be at least 1")
        self._max_failures = max(1, settings.max_failed_attempts)
        self._window = settings.lockout_window_seconds
        self._base_delay = settings.base_backoff_delay_seconds
        self._max_delay = settings.max_backoff_delay_seconds
        self._clock = clock
        self._max_tracked = max_tracked_ips
        self._ipv6_prefix_length = ipv6_prefix_length
        # Ordered by last failure, oldest first: the eviction order under pressure, and
        # the expiry order, which _sweep relies on.
        self._entries: OrderedDict[str, _Failures] = OrderedDict()
        # Verifications under way per IP (bounded by the connections that exist).
        self._pending: dict[str, int] = {}

    def __len__(self) -> int:
        """How many IPs are currently tracked."""
        return len(self._entries)

    def backoff_delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure: ``base * 2**(failures-1)``, capped;
        zero or less means none."""
        if failures < 1:
            return 0.0
        # Cap the exponent first: 2**n for a large n is a huge int, and a positive base
        # (one tick at least) reaches any cap by 2**64.
        exponent = min(failures - 1, 64)
        return float(min(self._base_delay * 2.0**exponent, self._max_delay))

    def retry_after(self, ip: str) -> float | None:
        """Seconds until ``ip`` may try again, or None when it may try now."""
        group = self._group(ip)
        now = self._clock()
        entry = self._live_entry(group, now)
        if entry is None:
            return None
        if entry.count >= self._max_failures:
            lockout_end = entry.first_failure + self._window
            if now < lockout_end:
                return lockout_end - now
            del self._entries[group]  # the lockout is over: the IP starts afresh
            return None
        until = entry.last_failure + self.backoff_delay(entry.count)
        return until - now if now < until else None

    def reserve(self, ip: str) -> bool:
        """Claim a verification slot for ``ip``; False when the failures it has plus the
        verifications it already has under way could reach the lockout. Without this,
        attempts sent in parallel would all pass :meth:`retry_after` before the first
        failure is recorded. Pair every True with :meth:`release`."""
        group = self._group(ip)
        pending = self._pending.get(group, 0)
        if self._lockable_failures(group) + pending >= self._max_failures:
            return False
        self._pending[group] = pending + 1
        return True

    def release(self, ip: str) -> None:
        """End a verification claimed with :meth:`reserve`."""
        group = self._group(ip)
        pending = self._pending.get(group, 0) - 1
        if pending > 0:
            self._pending[group] = pending
        else:
            self._pending.pop(group, None)

    def record_failure(self, ip: str, username: str) -> None:
        """Count a failed attempt at ``username`` (a wrong key or unknown user, not a
        blocked attempt)."""
        now = self._clock()
        group = self._group(ip)
        entry = self._entries.pop(group, None)
        if entry is None or now >= entry.expires_at:
            entry = _Failures(count=0, first_failure=now, last_failure=now, expires_at=now)
        entry.count += 1
        entry.last_failure = now
        entry.expires_at = now + self._window
        entry.note(username)
        self._entries[group] = entry
        self._sweep(now)

    def record_success(self, ip: str, username: str) -> None:
        """Forget the IP's failures at ``username`` only: holding that login's key says
        nothing about the client's guesses at other logins."""
        group = self._group(ip)
        entry = self._entries.get(group)
        if entry is None:
            return
        entry.count -= entry.by_login.pop(_login_key(username), 0)
        if entry.count <= 0:
            del self._entries[group]

    def _group(self, ip: str) -> str:
        return client_group(ip, self._ipv6_prefix_length)

    def _live_entry(self, group: str, now: float) -> _Failures | None:
        """The group's entry, dropping it once expired (as MemoryCache hides it)."""
        entry = self._entries.get(group)
        if entry is not None and now >= entry.expires_at:
            del self._entries[group]
            return None
        return entry

    def _lockable_failures(self, group: str) -> int:
        """Failures that more failures could turn into a lockout: none once the window
        from the first has passed, since reaching the limit then forgets the entry."""
        now = self._clock()
        entry = self._live_entry(group, now)
        if entry is None or now >= entry.first_failure + self._window:
            return 0
        return entry.count

    def _sweep(self, now: float) -> None:
        """Drop expired entries from the old end, then enforce the size cap.

        Entries are in the order of their last failure, which is their expiry order, so
        stopping at the first live entry drops every expired one.
        """
        while self._entries:
            ip, oldest = next(iter(self._entries.items()))
            if now < oldest.expires_at:
                break
            del self._entries[ip]
        while len(self._entries) > self._max_tracked:
            self._entries.popitem(last=False)
