"""The failed-login rate limiter: backoff, lockout and its window, per IP (IPv6 per
prefix), and the bounded table of tracked clients."""

from __future__ import annotations

from typing import Any

import pytest

from relate_smtp.handlers.ratelimit import MAX_LOGINS_PER_IP, RateLimiter
from tests.handlers.helpers import ALICE, IP, MALLORY, OTHER_IP, FakeClock, security


def make_limiter(clock: FakeClock, **kwargs: Any) -> RateLimiter:
    return RateLimiter(security(**kwargs).rate_limit, clock=clock)


def test_backoff_doubles_per_failure_up_to_the_cap() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=100)
    waits = []
    for _ in range(8):
        limiter.record_failure(IP, ALICE)
        waits.append(limiter.retry_after(IP))
        clock.advance(limiter.retry_after(IP) or 0.0)
        assert limiter.retry_after(IP) is None
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_scales_with_the_configured_base() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, base=0.5, cap=3.0, max_failed_attempts=100)
    assert [limiter.backoff_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert limiter.backoff_delay(10_000) == 3.0


def test_other_ips_are_not_affected() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock)
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 1.0
    assert limiter.retry_after(OTHER_IP) is None


def fail_with_backoffs(
    limiter: RateLimiter, clock: FakeClock, count: int, *, already: int = 0
) -> None:
    """Fail ``count`` times, each as soon as the previous backoff has passed.

    ``already`` is how many failures the current window holds before the first of these.
    """
    for n in range(already + 1, already + count + 1):
        assert limiter.retry_after(IP) is None
        limiter.record_failure(IP, ALICE)
        if n < already + count:
            clock.advance(limiter.backoff_delay(n))


def test_lockout_after_max_failed_attempts_lasts_until_the_window_ends() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=5, window=900)
    start = clock.now
    fail_with_backoffs(limiter, clock, 4)
    clock.advance(limiter.backoff_delay(4))
    assert limiter.retry_after(IP) is None  # four failures: only backoff so far
    limiter.record_failure(IP, ALICE)  # the fifth, at start + 15 s
    assert limiter.retry_after(IP) == pytest.approx(start + 900 - clock.now)
    clock.advance(31)  # past any backoff
    assert limiter.retry_after(IP) is not None
    clock.now = start + 899.9
    assert limiter.retry_after(IP) == pytest.approx(0.1)
    clock.now = start + 900
    assert limiter.retry_after(IP) is None
    limiter.record_failure(IP, ALICE)  # a new window: backoff 1 s again, no lockout
    assert limiter.retry_after(IP) == 1.0


def test_lockout_window_is_counted_from_the_first_failure() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=5, window=900)
    start = clock.now
    limiter.record_failure(IP, ALICE)
    clock.advance(600)
    fail_with_backoffs(limiter, clock, 4, already=1)  # waits 2 + 4 + 8 s between them
    assert clock.now == start + 614
    # Locked until 15 minutes after the first failure, not after the fifth.
    assert limiter.retry_after(IP) == pytest.approx(900 - 614)


def test_failures_in_different_windows_do_not_add_up() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=5, window=900)
    fail_with_backoffs(limiter, clock, 4)
    clock.advance(900)
    fail_with_backoffs(limiter, clock, 4)
    clock.advance(limiter.backoff_delay(4))
    assert limiter.retry_after(IP) is None
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == pytest.approx(900 - 15)


def test_success_clears_the_failures_at_its_own_login() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock)
    fail_with_backoffs(limiter, clock, 3)
    assert limiter.retry_after(IP) == 4.0
    limiter.record_success(IP, "Alice@Example.COM")  # logins match case-insensitively
    assert limiter.retry_after(IP) is None
    assert len(limiter) == 0
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 1.0


def test_success_leaves_the_failures_at_other_logins_counted() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock)
    limiter.record_failure(IP, ALICE)
    clock.advance(1)
    limiter.record_failure(IP, MALLORY)
    clock.advance(2)
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 4.0  # three failures in the IP's bucket
    limiter.record_success(IP, MALLORY)
    # Two left, both at alice: the backoff of two failures, from the last failure.
    assert limiter.retry_after(IP) == 2.0
    limiter.record_success(IP, "bob@example.com")  # no failures at bob: changes nothing
    assert limiter.retry_after(IP) == 2.0


def test_successes_between_guesses_do_not_delay_the_lockout() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=5, window=900)
    start = clock.now
    for n in range(1, 6):
        assert limiter.retry_after(IP) is None
        assert limiter.reserve(IP)
        limiter.release(IP)
        limiter.record_failure(IP, ALICE)
        clock.advance(limiter.backoff_delay(n))
        limiter.record_success(IP, MALLORY)
    assert not limiter.reserve(IP)
    assert limiter.retry_after(IP) == pytest.approx(start + 900 - clock.now)


def test_failures_at_too_many_logins_are_cleared_by_no_success() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=100, base=0.0)
    logins = [f"user{n}@example.com" for n in range(MAX_LOGINS_PER_IP + 3)]
    for login in logins:
        limiter.record_failure(IP, login)
    for login in logins:
        limiter.record_success(IP, login)
    # The logins past the cap were noted against none, so their failures stay.
    assert len(limiter) == 1
    for _ in range(96):
        limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) is None  # 99 failures: 3 left over + 96
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) is not None  # the 100th locks the IP out


@pytest.mark.parametrize(
    ("ip", "neighbour", "stranger"),
    [
        ("2001:db8:1:2::7", "2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:3::7"),
        ("192.0.2.10", "::ffff:192.0.2.10", "192.0.2.11"),
    ],
)
def test_ipv6_clients_are_limited_per_64_and_ipv4_per_address(
    ip: str, neighbour: str, stranger: str
) -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, max_failed_attempts=2)
    limiter.record_failure(ip, ALICE)
    clock.advance(1)
    limiter.record_failure(neighbour, ALICE)
    assert limiter.retry_after(ip) == pytest.approx(900 - 1)  # locked: two in one bucket
    assert limiter.retry_after(neighbour) == pytest.approx(900 - 1)
    assert limiter.retry_after(stranger) is None
    assert limiter.reserve(stranger)
    assert len(limiter) == 1


def test_the_ipv6_prefix_length_is_configurable() -> None:
    clock = FakeClock()
    limiter = RateLimiter(security().rate_limit, clock=clock, ipv6_prefix_length=128)
    limiter.record_failure("2001:db8::7", ALICE)
    assert limiter.retry_after("2001:db8::7") == 1.0
    assert limiter.retry_after("2001:db8::8") is None
    wide = RateLimiter(security().rate_limit, clock=clock, ipv6_prefix_length=48)
    wide.record_failure("2001:db8:0:1::7", ALICE)
    assert wide.retry_after("2001:db8:0:ffff::1") == 1.0
    assert wide.retry_after("2001:db8:1::1") is None


def test_tracked_ips_are_capped_oldest_first() -> None:
    clock = FakeClock()
    limiter = RateLimiter(security().rate_limit, clock=clock, max_tracked_ips=3)
    for i in range(5):
        limiter.record_failure(f"203.0.113.{i}", ALICE)
        clock.advance(0.01)
    assert len(limiter) == 3
    assert limiter.retry_after("203.0.113.0") is None
    assert limiter.retry_after("203.0.113.1") is None
    assert limiter.retry_after("203.0.113.4") is not None


def test_expired_entries_are_dropped() -> None:
    clock = FakeClock()
    limiter = make_limiter(clock, window=60)
    for i in range(100):
        limiter.record_failure(f"203.0.113.{i}", ALICE)
    assert len(limiter) == 100
    clock.advance(60)
    limiter.record_failure(OTHER_IP, ALICE)
    assert len(limiter) == 1


# The original's CheckRateLimit at its boundaries: Max 3, window 100 s, backoff 1 s
# doubling up to 30 s, unless a test says otherwise.


def original_limiter(clock: FakeClock, **kwargs: Any) -> RateLimiter:
    settings = {"max_failed_attempts": 3, "window": 100.0, "base": 1.0, "cap": 30.0, **kwargs}
    return make_limiter(clock, **settings)


def fail_at(limiter: RateLimiter, clock: FakeClock, start: float, *offsets: float) -> None:
    for offset in offsets:
        clock.now = start + offset
        limiter.record_failure(IP, ALICE)


def test_max_minus_one_failures_only_back_off() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock)
    start = clock.now
    fail_at(limiter, clock, start, 0, 1)  # two failures: backoff 2 s from the last
    assert limiter.retry_after(IP) == 2.0
    clock.now = start + 2.999
    assert limiter.retry_after(IP) == pytest.approx(0.001)
    clock.now = start + 3
    assert limiter.retry_after(IP) is None
    assert limiter.reserve(IP)  # one more may be verified, not two: the third locks
    assert not limiter.reserve(IP)


def test_the_max_th_failure_locks_until_first_failure_plus_window() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock)
    start = clock.now
    fail_at(limiter, clock, start, 0, 1, 3)
    assert limiter.retry_after(IP) == pytest.approx(97.0)
    assert not limiter.reserve(IP)
    clock.now = start + 99.999
    assert limiter.retry_after(IP) == pytest.approx(0.001)
    clock.now = start + 100
    assert limiter.retry_after(IP) is None
    assert len(limiter) == 0  # the lockout is over: forgotten, count and all
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 1.0  # a first failure again


def test_the_end_of_a_lockout_ignores_the_backoff() -> None:
    """Locked at 3 s until 4 s; the third failure's backoff (4 s from 3 s, so until 7 s)
    does not extend it."""
    clock = FakeClock()
    limiter = original_limiter(clock, window=4.0)
    start = clock.now
    fail_at(limiter, clock, start, 0, 1, 3)
    assert limiter.retry_after(IP) == pytest.approx(1.0)
    clock.now = start + 4
    assert limiter.retry_after(IP) is None


def test_the_failure_record_expires_a_window_after_the_last_failure() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock)
    start = clock.now
    fail_at(limiter, clock, start, 0, 60)
    clock.now = start + 159.999  # 100 s after the last failure, not the first
    limiter.record_failure(IP, ALICE)  # still the same record: the third failure
    assert len(limiter) == 1
    # Locked? No: the window from the first failure has passed, so reaching Max forgets.
    assert limiter.retry_after(IP) is None
    assert len(limiter) == 0
    fail_at(limiter, clock, start, 200, 250)
    clock.now = start + 350  # exactly a window after the last failure: expired
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 1.0  # a first failure again


def test_the_max_th_failure_just_inside_the_window_locks() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock, base=0.0)
    start = clock.now
    fail_at(limiter, clock, start, 0, 60, 99.5)
    assert limiter.retry_after(IP) == pytest.approx(0.5)


def test_a_record_past_its_first_window_reserves_like_a_new_client() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock, base=0.0)
    start = clock.now
    fail_at(limiter, clock, start, 0, 60)
    clock.now = start + 100  # two failures live, but they can no longer lock
    assert [limiter.reserve(IP) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("max_failed_attempts", [1, 0, -5])
def test_max_failed_attempts_of_one_or_less_locks_at_the_first_failure(
    max_failed_attempts: int,
) -> None:
    clock = FakeClock()
    limiter = original_limiter(clock, max_failed_attempts=max_failed_attempts)
    assert limiter.reserve(IP)
    assert not limiter.reserve(IP)  # one verification at a time
    limiter.release(IP)
    limiter.record_failure(IP, ALICE)
    assert limiter.retry_after(IP) == 100.0
    assert not limiter.reserve(IP)


def test_backoff_doubles_from_the_last_failure_and_stops_at_the_cap() -> None:
    clock = FakeClock()
    limiter = original_limiter(clock, max_failed_attempts=100, base=0.25, cap=3.0)
    for n, delay in enumerate([0.25, 0.5, 1.0, 2.0, 3.0, 3.0], start=1):
        limiter.record_failure(IP, ALICE)
        last = clock.now
        assert limiter.retry_after(IP) == delay, n
        clock.now = last + delay - 0.001
        assert limiter.retry_after(IP) == pytest.approx(0.001)
        clock.now = last + delay
        assert limiter.retry_after(IP) is None


@pytest.mark.parametrize(("base", "cap"), [(0.0, 30.0), (-1.0, 30.0), (1.0, 0.0), (1.0, -1.0)])
def test_a_backoff_of_zero_or_less_is_no_wait(base: float, cap: float) -> None:
    clock = FakeClock()
    limiter = original_limiter(clock, base=base, cap=cap)
    fail_at(limiter, clock, clock.now, 0, 0)
    assert limiter.retry_after(IP) is None
