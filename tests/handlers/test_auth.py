"""API keys, rate limiting, the result cache, the authenticator and LastUsedAt updates.

The store is an in-memory fake with call counters, so each test can say exactly which
queries an AUTH made. Hashes use bcrypt cost 4 unless the test is about the hash format.
Time is a fake monotonic clock moved by hand; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import bcrypt
import pytest
import trio
import trio.testing

from relate_smtp.config import RateLimitSettings, SecuritySettings
from relate_smtp.handlers.apikeys import (
    generate_api_key,
    has_smtp_scope,
    hash_api_key,
    key_prefix,
    verify_api_key,
)
from relate_smtp.handlers.auth import (
    KEYS_VERIFIED_PER_ATTEMPT,
    Authenticator,
    AuthOutcome,
    CachedResult,
    ResultCache,
)
from relate_smtp.handlers.lastused import LastUsedUpdater
from relate_smtp.handlers.ratelimit import MAX_LOGINS_PER_IP, RateLimiter
from relate_smtp.storage import (
    ApiKey,
    NewEmail,
    PoolStats,
    SavedEmail,
    StoreUnavailable,
    User,
)

FAST_COST = 4
SALT = "test-salt"
IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
CREATED = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)

# Test vectors of jBCrypt, which BCrypt.Net's own tests reuse: hashes made by the
# platform's library family, not by the bcrypt package under test.
BCRYPT_NET_VECTORS = [
    ("", "$2a$06$DCq7YPn5Rq63x1Lad4cll.TV4S6ytwfsfvkgY8jIucDrjc8deX1s."),
    ("abc", "$2a$06$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i"),
    (
        "abcdefghijklmnopqrstuvwxyz",
        "$2a$06$.rCVZVOThsIa97pEDOxvGuRRgzG64bvtJ0938xuqzv18d3ZpQhstC",
    ),
    (
        "~!@#$%^&*()      ~!@#$%^&*()PNBFRD",
        "$2a$06$fPIsBO8qRqkjj273rfaOI.HtSV9jLDpTbZn782DC6/t7qT67P6FfO",
    ),
]


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingVerify:
    """The real verify_api_key, counting calls and noting which thread ran them."""

    def __init__(self) -> None:
        self.calls = 0
        self.hashes: list[str] = []
        self.threads: set[int] = set()

    def __call__(self, raw: str, key_hash: str) -> bool:
        self.calls += 1
        self.hashes.append(key_hash)
        self.threads.add(threading.get_ident())
        return verify_api_key(raw, key_hash)


class FakeStore:
    """Just enough of the Store protocol, in memory, with a counter per query.

    ``candidate_api_keys`` filters like the real query (this user's non-revoked keys with
    the given prefix or none) unless ``leak_revoked`` asks it to misbehave.
    """

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.keys: list[ApiKey] = []
        self.calls: Counter[str] = Counter()
        self.lookups: Counter[str] = Counter()
        self.touched: list[dict[uuid.UUID, datetime]] = []
        self.unavailable = False
        self.touch_unavailable = False
        self.leak_revoked = False

    def add_user(self, email: str, *aliases: str) -> User:
        user = User(id=uuid.uuid4(), email=email)
        for address in (email, *aliases):
            self.users[address.lower()] = user
        return user

    def add_key(
        self,
        user: User,
        raw: str,
        *,
        key_hash: str | None = None,
        scopes: str = '["smtp"]',
        legacy: bool = False,
        revoked: bool = False,
        created: datetime = CREATED,
        last_used: datetime | None = None,
    ) -> ApiKey:
        key = ApiKey(
            id=uuid.uuid4(),
            user_id=user.id,
            name="test",
            key_hash=key_hash if key_hash is not None else hash_api_key(raw, cost=FAST_COST),
            key_prefix=None if legacy else key_prefix(raw),
            scopes=scopes,
            created_at=created,
            last_used_at=last_used,
            revoked_at=CREATED if revoked else None,
        )
        self.keys.append(key)
        return key

    @property
    def queries(self) -> int:
        return self.calls["find_user_by_address"] + self.calls["candidate_api_keys"]

    async def find_user_by_address(self, address: str) -> User | None:
        self.calls["find_user_by_address"] += 1
        self.lookups[address.lower()] += 1
        if self.unavailable:
            raise StoreUnavailable("database down")
        return self.users.get(address.lower())

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        return tuple(a for a, u in self.users.items() if u.id == user_id)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        self.calls["candidate_api_keys"] += 1
        if self.unavailable:
            raise StoreUnavailable("database down")
        return [
            k
            for k in self.keys
            if k.user_id == user_id
            and (k.revoked_at is None or self.leak_revoked)
            and (k.key_prefix is None or k.key_prefix == prefix)
        ]

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        self.calls["touch_api_keys"] += 1
        if self.touch_unavailable:
            raise StoreUnavailable("database down")
        self.touched.append(dict(last_used))

    async def save_email(self, email: NewEmail) -> SavedEmail:
        raise NotImplementedError

    async def ping(self) -> None:
        pass

    def pool_stats(self) -> PoolStats:
        return PoolStats(active=0, maximum=1)

    async def aclose(self) -> None:
        pass


def security(
    *,
    salt: str = SALT,
    max_failed_attempts: int = 5,
    window: float = 900.0,
    base: float = 1.0,
    cap: float = 30.0,
) -> SecuritySettings:
    return SecuritySettings(
        authentication_salt=salt,
        rate_limit=RateLimitSettings(
            max_failed_attempts=max_failed_attempts,
            lockout_window_seconds=window,
            base_backoff_delay_seconds=base,
            max_backoff_delay_seconds=cap,
        ),
    )


class Harness:
    """An authenticator over a fake store with one user, ``alice``, and her SMTP key."""

    def __init__(
        self, settings: SecuritySettings | None = None, *, queue_capacity: int = 16
    ) -> None:
        self.store = FakeStore()
        self.clock = FakeClock()
        self.verify = CountingVerify()
        self.successes = 0
        self.updater = LastUsedUpdater(self.store, capacity=queue_capacity, min_interval=0)
        self.alice = self.store.add_user("Alice@Example.com", "alias@example.org")
        self.raw = generate_api_key()
        self.key = self.store.add_key(self.alice, self.raw)
        self.auth = Authenticator(
            self.store,
            settings if settings is not None else security(),
            clock=self.clock,
            wall_clock=self.wall_clock,
            last_used=self.updater,
            verify=self.verify,
        )

    async def login(
        self, username: str = "alice@example.com", password: str | None = None, ip: str = IP
    ) -> AuthOutcome:
        result = await self.auth.authenticate(
            username, self.raw if password is None else password, ip
        )
        return result.outcome

    def wall_clock(self) -> datetime:
        """NOW plus one second per call, so the stored LastUsedAt tells which call made it."""
        self.successes += 1
        return NOW + timedelta(seconds=self.successes - 1)

    async def last_used_writes(self) -> list[dict[uuid.UUID, datetime]]:
        """Shut the updater down the way the server does and return what it wrote."""
        self.updater.close()
        with trio.fail_after(5):
            await self.updater.run()
        return self.store.touched


# --- API keys ---------------------------------------------------------------------


def test_generated_keys_are_marked_random_and_url_safe() -> None:
    keys = {generate_api_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("rsk_")
        body = key.removeprefix("rsk_")
        assert len(body) >= 43  # 32 bytes of entropy in base64
        assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert key_prefix(key) == key[:12]
    assert len({key_prefix(k) for k in keys}) == 50


def test_new_hashes_are_2b_at_bcrypt_net_default_cost() -> None:
    raw = generate_api_key()
    key_hash = hash_api_key(raw)
    assert key_hash.startswith("$2b$11$")
    assert verify_api_key(raw, key_hash)
    assert not verify_api_key(raw + "x", key_hash)


@pytest.mark.parametrize(("raw", "key_hash"), BCRYPT_NET_VECTORS)
def test_bcrypt_net_2a_vectors_verify(raw: str, key_hash: str) -> None:
    assert verify_api_key(raw, key_hash)
    assert not verify_api_key(raw + "!", key_hash)


def test_2a_made_like_bcrypt_net_and_2b_at_cost_10_verify() -> None:
    raw = generate_api_key()
    made_2a = bcrypt.hashpw(raw.encode(), bcrypt.gensalt(rounds=FAST_COST, prefix=b"2a"))
    made_2b = bcrypt.hashpw(raw.encode(), bcrypt.gensalt(rounds=10, prefix=b"2b"))
    assert made_2a.startswith(b"$2a$04$")
    assert made_2b.startswith(b"$2b$10$")
    assert verify_api_key(raw, made_2a.decode())
    assert verify_api_key(raw, made_2b.decode())
    assert not verify_api_key("wrong", made_2b.decode())


def test_php_2y_hash_verifies() -> None:
    # Made by PHP's password_hash (Vapor's test suite), cost 11.
    assert verify_api_key("Vapor3", "$2y$11$kHM/VXmCVsGXDGIVu9mD8eY/uEYI.Nva9sHgrLYuLzr0il28DDOGO")


def test_2y_hashes_verify() -> None:
    made_2b = hash_api_key("secret", cost=FAST_COST)
    as_2y = "$2y$" + made_2b[4:]
    assert verify_api_key("secret", as_2y)
    assert not verify_api_key("Secret", as_2y)


@pytest.mark.parametrize(
    "key_hash",
    [
        "",
        "garbage",
        "$2a$",
        "$2a$99$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i",
        "$2a$03$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i",
        "$2x$06$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i",
        "$1$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i",
        "$2a$06$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0",
        "$2a$06$!!!!!!!!!!!!!!!!!!!!!!0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i",
        "$2a$06$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7hé",
    ],
)
def test_malformed_hashes_never_verify_and_never_raise(key_hash: str) -> None:
    assert verify_api_key("abc", key_hash) is False


def test_passwords_are_cut_at_72_bytes_like_bcrypt_net() -> None:
    raw = "k" * 72
    key_hash = hash_api_key(raw + "first tail", cost=FAST_COST)
    # BCrypt.Net ignores everything after byte 72, in hashing and in verifying.
    assert verify_api_key(raw, key_hash)
    assert verify_api_key(raw + "another tail", key_hash)
    assert not verify_api_key("k" * 71, key_hash)
    # Counted in UTF-8 bytes, not characters: 36 two-byte characters fill the 72.
    wide = "é" * 36
    wide_hash = hash_api_key(wide, cost=FAST_COST)
    assert verify_api_key(wide + "ignored", wide_hash)
    assert not verify_api_key("é" * 35, wide_hash)


def test_unencodable_passwords_fail_quietly() -> None:
    key_hash = hash_api_key("abc", cost=FAST_COST)
    assert verify_api_key("\ud800", key_hash) is False


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        ('["smtp"]', True),
        ('["SMTP"]', True),
        ('["read", "Smtp"]', True),
        ('[null, "smtp"]', True),
        ("[]", False),
        ('["smtps", "imap"]', False),
        ('"smtp"', False),
        ('{"smtp": true}', False),
        ('["smtp", 1]', False),
        ("null", False),
        ("[smtp]", False),
        ("", False),
        ("[" * 100_000, False),
    ],
)
def test_smtp_scope(scopes: str, expected: bool) -> None:
    assert has_smtp_scope(scopes) is expected


# --- rate limiter -------------------------------------------------------------------


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


# --- authenticator ------------------------------------------------------------------


async def test_success_with_a_prefix_key() -> None:
    h = Harness()
    result = await h.auth.authenticate("alice@example.com", h.raw, IP)
    assert result.outcome is AuthOutcome.SUCCESS
    assert result.user_id == h.alice.id
    assert result.address == "alice@example.com"
    assert h.verify.calls == 1
    assert h.verify.hashes == [h.key.key_hash]
    assert threading.get_ident() not in h.verify.threads  # bcrypt ran off the event loop
    assert await h.last_used_writes() == [{h.key.id: NOW}]


async def test_bcrypt_runs_under_the_given_thread_limiter() -> None:
    store = FakeStore()
    alice = store.add_user("alice@example.com")
    raw = generate_api_key()
    store.add_key(alice, raw)
    limiter = trio.CapacityLimiter(1)
    borrowed: list[int] = []

    def verify(password: str, key_hash: str) -> bool:
        borrowed.append(limiter.borrowed_tokens)
        return verify_api_key(password, key_hash)

    auth = Authenticator(store, security(), limiter=limiter, verify=verify)
    result = await auth.authenticate("alice@example.com", raw, IP)
    assert result.outcome is AuthOutcome.SUCCESS
    assert borrowed == [1]
    assert limiter.borrowed_tokens == 0


async def test_login_is_case_insensitive_and_reported_lower_cased() -> None:
    h = Harness()
    result = await h.auth.authenticate("ALICE@example.COM", h.raw, IP)
    assert result.outcome is AuthOutcome.SUCCESS
    assert result.address == "alice@example.com"


@pytest.mark.parametrize("authzid", ["", "alice@example.com", "ALICE@Example.com"])
async def test_authorization_identity_empty_or_the_login_itself(authzid: str) -> None:
    h = Harness()
    result = await h.auth.authenticate("Alice@example.com", h.raw, IP, authorization_id=authzid)
    assert result.outcome is AuthOutcome.SUCCESS


@pytest.mark.parametrize("authzid", ["bob@example.com", "alias@example.org", "admin"])
async def test_authorization_identity_of_someone_else_is_refused(authzid: str) -> None:
    """RFC 4616 §2: the server may refuse to let the login act as another identity;
    Relate has no proxy authorization, so a valid key does not help (535 5.7.8)."""
    h = Harness()
    result = await h.auth.authenticate("alice@example.com", h.raw, IP, authorization_id=authzid)
    assert result.outcome is AuthOutcome.FAILED
    assert h.verify.calls == 0
    assert h.store.calls["find_user_by_address"] == 0


async def test_an_additional_address_does_not_log_in() -> None:
    """SPEC §3 matches the login on Users.Email only; a verified alias receives mail."""
    h = Harness()
    alias = await h.auth.authenticate("Alias@Example.org", h.raw, OTHER_IP)
    assert alias.outcome is AuthOutcome.FAILED
    assert h.store.calls["candidate_api_keys"] == 0


async def test_success_with_a_legacy_key_without_prefix() -> None:
    h = Harness()
    legacy_raw = "an-old-key-made-before-prefixes"
    legacy = h.store.add_key(h.alice, legacy_raw, legacy=True)
    assert await h.login(password=legacy_raw) is AuthOutcome.SUCCESS
    # The prefix key found by the lookup does not match; the legacy key is tried after it.
    assert h.verify.hashes == [legacy.key_hash]
    assert await h.last_used_writes() == [{legacy.id: NOW}]


async def test_prefix_matched_keys_are_tried_before_legacy_keys() -> None:
    h = Harness()
    h.store.keys.clear()
    legacy = h.store.add_key(h.alice, "legacy-one", legacy=True)
    key = h.store.add_key(h.alice, h.raw)
    assert await h.login() is AuthOutcome.SUCCESS
    assert h.verify.hashes == [key.key_hash]
    assert legacy.key_hash not in h.verify.hashes


async def test_bcrypt_net_hashes_authenticate() -> None:
    h = Harness()
    h.store.keys.clear()
    raw = generate_api_key()
    made_2a = bcrypt.hashpw(raw.encode(), bcrypt.gensalt(rounds=FAST_COST, prefix=b"2a"))
    h.store.add_key(h.alice, raw, key_hash=made_2a.decode())
    assert await h.login(password=raw) is AuthOutcome.SUCCESS


async def test_wrong_key_fails_and_is_counted() -> None:
    h = Harness()
    assert await h.login(password=h.raw[:-1] + "?") is AuthOutcome.FAILED
    assert h.auth.rate_limiter.retry_after(IP) == 1.0
    assert await h.last_used_writes() == []


async def test_another_users_key_fails() -> None:
    h = Harness()
    bob = h.store.add_user("bob@example.com")
    bob_raw = generate_api_key()
    h.store.add_key(bob, bob_raw)
    assert await h.login(password=bob_raw) is AuthOutcome.FAILED
    assert await h.login("bob@example.com", bob_raw, OTHER_IP) is AuthOutcome.SUCCESS


async def test_revoked_key_fails() -> None:
    h = Harness()
    h.store.keys.clear()
    h.store.add_key(h.alice, h.raw, revoked=True)
    assert await h.login() is AuthOutcome.FAILED


async def test_revoked_key_fails_even_if_the_store_returns_it() -> None:
    h = Harness()
    h.store.keys.clear()
    h.store.leak_revoked = True
    h.store.add_key(h.alice, h.raw, revoked=True)
    assert await h.login() is AuthOutcome.FAILED
    assert h.store.keys[0].key_hash not in h.verify.hashes


async def test_key_without_smtp_scope_fails_without_checking_its_hash() -> None:
    h = Harness()
    h.store.keys.clear()
    key = h.store.add_key(h.alice, h.raw, scopes='["api"]')
    assert await h.login() is AuthOutcome.FAILED
    assert key.key_hash not in h.verify.hashes
    assert h.verify.calls == 1  # the dummy verification, so timing gives nothing away


async def test_smtp_scope_is_case_insensitive() -> None:
    h = Harness()
    h.store.keys.clear()
    h.store.add_key(h.alice, h.raw, scopes='["Api", "SMTP"]')
    assert await h.login() is AuthOutcome.SUCCESS


async def test_malformed_scopes_fail() -> None:
    h = Harness()
    h.store.keys.clear()
    h.store.add_key(h.alice, h.raw, scopes="smtp")
    assert await h.login() is AuthOutcome.FAILED


async def test_unknown_user_fails_after_the_same_bcrypt_work() -> None:
    h = Harness()
    assert await h.login("nobody@example.com") is AuthOutcome.FAILED
    assert h.store.calls["find_user_by_address"] == 1
    assert h.store.calls["candidate_api_keys"] == 0
    assert h.verify.calls == 1
    assert h.verify.hashes[0].startswith("$2b$11$")  # the cost of a real key
    assert h.auth.rate_limiter.retry_after(IP) == 1.0


async def test_long_password_is_cut_at_72_bytes() -> None:
    h = Harness()
    h.store.keys.clear()
    raw = "rsk_" + "x" * 76  # 80 characters; bcrypt sees the first 72
    h.store.add_key(h.alice, raw)
    assert await h.login(password=raw) is AuthOutcome.SUCCESS
    same_72_bytes = raw[:72] + "different-tail"
    assert await h.login(password=same_72_bytes, ip=OTHER_IP) is AuthOutcome.SUCCESS
    assert await h.login(password=raw[:71], ip="203.0.113.1") is AuthOutcome.FAILED


async def test_blocked_attempts_touch_nothing_and_are_not_counted() -> None:
    h = Harness()
    assert await h.login(password="wrong") is AuthOutcome.FAILED
    queries, verifications = h.store.queries, h.verify.calls
    for _ in range(10):
        result = await h.auth.authenticate("alice@example.com", h.raw, IP)
        assert result.outcome is AuthOutcome.BLOCKED
        assert result.retry_after == 1.0
    assert (h.store.queries, h.verify.calls) == (queries, verifications)
    h.clock.advance(1.0)
    assert await h.login(password="wrong again") is AuthOutcome.FAILED
    # Second counted failure: 2 s. Had the blocked attempts counted, it would be 30 s.
    assert h.auth.rate_limiter.retry_after(IP) == 2.0


async def test_other_ips_are_not_blocked() -> None:
    h = Harness()
    assert await h.login(password="wrong") is AuthOutcome.FAILED
    assert await h.login(ip=OTHER_IP) is AuthOutcome.SUCCESS


async def test_lockout_after_repeated_failures() -> None:
    h = Harness(security(max_failed_attempts=3, window=900))
    for attempt in range(3):
        assert await h.login(password=f"wrong {attempt}") is AuthOutcome.FAILED
        h.clock.advance(h.auth.rate_limiter.backoff_delay(attempt + 1))
    assert await h.login() is AuthOutcome.BLOCKED  # even with the right key
    h.clock.advance(15 * 60)
    assert await h.login() is AuthOutcome.SUCCESS


async def test_success_clears_failures() -> None:
    h = Harness()
    for attempt in range(3):
        assert await h.login(password=f"wrong {attempt}") is AuthOutcome.FAILED
        h.clock.advance(h.auth.rate_limiter.backoff_delay(attempt + 1))
    assert await h.login() is AuthOutcome.SUCCESS
    assert await h.login(password="wrong again") is AuthOutcome.FAILED
    assert h.auth.rate_limiter.retry_after(IP) == 1.0


async def test_logins_to_ones_own_account_do_not_launder_guesses_at_another() -> None:
    """For 40 s, one IP alternates a wrong guess at alice with a correct login to its
    own account, each as soon as the limiter lets it. Had a success cleared the IP's
    failures, every guess would wait only 1 s: about 35 of them."""
    h = Harness()  # 5 failures per 15 min, backoff from 1 s doubling
    mallory = h.store.add_user(MALLORY)
    mallory_key = generate_api_key()
    h.store.add_key(mallory, mallory_key)
    start = h.clock.now
    guesses = own_logins = 0
    while h.clock.now < start + 40:
        at_alice = guesses == own_logins
        username, password = (ALICE, f"guess-{guesses}") if at_alice else (MALLORY, mallory_key)
        result = await h.auth.authenticate(username, password, IP)
        if result.outcome is AuthOutcome.BLOCKED:
            h.clock.advance(min(result.retry_after or 1.0, 1.0))  # try again within 1 s
            continue
        assert result.outcome is (AuthOutcome.FAILED if at_alice else AuthOutcome.SUCCESS)
        guesses, own_logins = (guesses + 1, own_logins) if at_alice else (guesses, own_logins + 1)
        h.clock.advance(0.1)
    assert h.store.lookups[ALICE] == 5  # guesses that reached the database and bcrypt
    assert guesses == 5
    assert await h.login(password="one more guess") is AuthOutcome.BLOCKED
    assert await h.login(MALLORY, mallory_key) is AuthOutcome.BLOCKED  # the IP is locked
    assert await h.login(ip=OTHER_IP) is AuthOutcome.SUCCESS


async def test_neighbours_in_one_ipv6_64_share_their_failures() -> None:
    h = Harness(security(max_failed_attempts=2))
    assert await h.login(password="wrong", ip="2001:db8:5:6::1") is AuthOutcome.FAILED
    h.clock.advance(1)
    assert await h.login(password="wrong", ip="2001:db8:5:6::2") is AuthOutcome.FAILED
    assert await h.login(ip="2001:db8:5:6:ffff::3") is AuthOutcome.BLOCKED
    assert await h.login(ip="2001:db8:5:7::1") is AuthOutcome.SUCCESS


async def test_the_authenticator_passes_its_ipv6_prefix_length_on() -> None:
    store = FakeStore()
    auth = Authenticator(store, security(max_failed_attempts=1), ipv6_prefix_length=128)
    result = await auth.authenticate("nobody@example.com", "wrong", "2001:db8::1")
    assert result.outcome is AuthOutcome.FAILED
    assert auth.rate_limiter.retry_after("2001:db8::1") is not None
    assert auth.rate_limiter.retry_after("2001:db8::2") is None


def add_older_keys(store: FakeStore, user: User, count: int, **kwargs: Any) -> list[ApiKey]:
    return [store.add_key(user, f"older-key-{n}", legacy=True, **kwargs) for n in range(count)]


async def test_a_refusal_costs_the_same_bcrypt_work_whatever_the_account() -> None:
    h = Harness()
    older = h.store.add_user("older@example.com")
    add_older_keys(h.store, older, 3)
    both = h.store.add_user("both@example.com")
    both_raw = generate_api_key()
    h.store.add_key(both, both_raw)
    add_older_keys(h.store, both, 2)
    no_smtp = h.store.add_user("nosmtp@example.com")
    h.store.add_key(no_smtp, generate_api_key(), scopes='["api"]')
    attempts = {
        "unknown user": ("nobody@example.com", "wrong"),
        "prefixed key, prefix matches": (ALICE, h.raw[:12] + "wrong"),
        "prefixed key, prefix differs": (ALICE, "wrong"),
        "three older keys": ("older@example.com", "wrong"),
        "older and prefixed keys": ("both@example.com", both_raw[:12] + "wrong"),
        "no smtp key": ("nosmtp@example.com", "wrong"),
    }
    verifications = {}
    for n, (case, (username, password)) in enumerate(attempts.items()):
        before = h.verify.calls
        assert await h.login(username, password, f"203.0.113.{n}") is AuthOutcome.FAILED
        verifications[case] = h.verify.calls - before
    assert verifications == dict.fromkeys(attempts, KEYS_VERIFIED_PER_ATTEMPT)


async def test_the_most_recently_used_older_key_is_the_one_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.store.keys.clear()
    used_long_ago, used_lately, never_used = (
        h.store.add_key(h.alice, f"older-key-{n}", legacy=True, last_used=last_used)
        for n, last_used in enumerate((NOW - timedelta(days=300), NOW, None))
    )
    assert await h.login(password="older-key-1") is AuthOutcome.SUCCESS
    assert h.verify.hashes == [used_lately.key_hash]
    # The price of a fixed cost per attempt: the other older keys are not checked.
    with caplog.at_level(logging.WARNING, logger="relate_smtp.auth"):
        assert await h.login(password="older-key-0", ip=OTHER_IP) is AuthOutcome.FAILED
    assert h.verify.hashes == [used_lately.key_hash, used_lately.key_hash]
    assert used_long_ago.key_hash not in h.verify.hashes
    assert never_used.key_hash not in h.verify.hashes
    assert "2 older keys without KeyPrefix were not checked" in caplog.text
    assert "older-key-0" not in caplog.text


async def test_without_use_the_newest_older_key_is_tried() -> None:
    h = Harness()
    h.store.keys.clear()
    for n in range(3):
        h.store.add_key(h.alice, f"older-key-{n}", legacy=True, created=CREATED + timedelta(n))
    assert await h.login(password="older-key-2") is AuthOutcome.SUCCESS
    assert await h.login(password="older-key-0", ip=OTHER_IP) is AuthOutcome.FAILED


async def test_refusal_time_does_not_depend_on_the_account() -> None:
    """Medians of real bcrypt runs at a low cost, the three cases interleaved so that
    machine noise hits them alike. Checking every older key took about 3x as long."""
    cost = 6
    store = FakeStore()
    prefixed = store.add_user("prefixed@example.com")
    raw = generate_api_key()
    store.add_key(prefixed, raw, key_hash=hash_api_key(raw, cost=cost))
    older = store.add_user("older@example.com")
    for n in range(3):
        store.add_key(older, f"k{n}", key_hash=hash_api_key(f"k{n}", cost=cost), legacy=True)
    auth = Authenticator(
        store,
        security(max_failed_attempts=1_000_000, base=0.0, cap=0.0),
        dummy_hash=hash_api_key(generate_api_key(), cost=cost),
    )
    cases = {
        "unknown user": ("nobody@example.com", ""),
        "prefixed key": ("prefixed@example.com", raw[:12]),
        "three older keys": ("older@example.com", ""),
    }
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for n in range(15):
        for case, (username, start_of_password) in cases.items():
            started = time.perf_counter()
            result = await auth.authenticate(username, f"{start_of_password}wrong-{n}", IP)
            samples[case].append(time.perf_counter() - started)
            assert result.outcome is AuthOutcome.FAILED
    medians = {case: statistics.median(times) for case, times in samples.items()}
    assert max(medians.values()) < 2 * min(medians.values()), medians


async def test_store_failure_is_temporary_and_neither_counted_nor_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.store.unavailable = True
    for _ in range(10):
        result = await h.auth.authenticate("alice@example.com", h.raw, IP)
        assert result.outcome is AuthOutcome.TEMPORARY
    assert h.auth.rate_limiter.retry_after(IP) is None
    assert len(h.auth.cache) == 0
    assert h.verify.calls == 0
    assert "store unavailable" in caplog.text
    assert h.raw not in caplog.text
    h.store.unavailable = False
    assert await h.login() is AuthOutcome.SUCCESS


async def test_store_failure_while_listing_keys_is_temporary() -> None:
    h = Harness()

    async def broken(user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        raise StoreUnavailable("connection reset")

    h.store.candidate_api_keys = broken  # type: ignore[method-assign]
    assert await h.login() is AuthOutcome.TEMPORARY
    assert h.auth.rate_limiter.retry_after(IP) is None


async def test_cache_hit_skips_the_store_and_bcrypt() -> None:
    h = Harness()
    assert await h.login() is AuthOutcome.SUCCESS
    queries = h.store.queries
    for _ in range(5):
        result = await h.auth.authenticate("Alice@Example.com", h.raw, IP)
        assert result.outcome is AuthOutcome.SUCCESS
        assert result.user_id == h.alice.id
    assert h.verify.calls == 1
    assert h.store.queries == queries
    # Every success, cached or not, refreshes LastUsedAt; the updater keeps the latest.
    assert h.updater.dropped == 0
    assert await h.last_used_writes() == [{h.key.id: NOW + timedelta(seconds=5)}]


async def test_concurrent_identical_logins_share_one_bcrypt() -> None:
    h = Harness()
    outcomes: list[AuthOutcome] = []

    async def login(ip: str) -> None:
        outcomes.append(await h.login(ip=ip))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(login, f"192.0.2.{i}")
    assert outcomes == [AuthOutcome.SUCCESS] * 10
    assert h.verify.calls == 1


async def test_concurrent_wrong_passwords_all_count_as_failures() -> None:
    h = Harness()

    async def login(ip: str) -> None:
        assert await h.login(password="wrong", ip=ip) is AuthOutcome.FAILED

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(login, f"192.0.2.{i}")
    assert h.verify.calls == 1
    assert all(h.auth.rate_limiter.retry_after(f"192.0.2.{i}") is not None for i in range(3))


async def test_cached_failure_still_counts_against_the_ip() -> None:
    h = Harness()
    assert await h.login(password="wrong") is AuthOutcome.FAILED
    h.clock.advance(1.0)
    assert await h.login(password="wrong") is AuthOutcome.FAILED
    assert h.verify.calls == 1
    assert h.auth.rate_limiter.retry_after(IP) == 2.0


async def test_cache_entries_expire_after_30_seconds() -> None:
    h = Harness()
    assert await h.login() is AuthOutcome.SUCCESS
    h.clock.advance(29.9)
    assert await h.login() is AuthOutcome.SUCCESS
    assert h.verify.calls == 1
    h.clock.advance(0.1)
    assert await h.login() is AuthOutcome.SUCCESS
    assert h.verify.calls == 2


async def test_revoked_key_stops_working_when_its_cache_entry_expires() -> None:
    h = Harness()
    assert await h.login() is AuthOutcome.SUCCESS
    h.store.keys.clear()
    assert await h.login() is AuthOutcome.SUCCESS
    h.clock.advance(30)
    assert await h.login() is AuthOutcome.FAILED


def test_cache_is_keyed_by_hmac_of_the_login() -> None:
    clock = FakeClock()
    cache = ResultCache(SALT, clock=clock)
    password = generate_api_key()
    key = cache.key_for("Alice@Example.com", password)
    expected = hmac.new(
        SALT.encode(), f"alice@example.com:{password}".encode(), hashlib.sha256
    ).digest()
    assert key == expected
    cache.put(key, CachedResult(outcome=AuthOutcome.FAILED))
    assert cache.get(key) == CachedResult(outcome=AuthOutcome.FAILED)
    assert password not in repr(vars(cache))
    assert password.encode() not in repr(vars(cache)).encode()
    assert ResultCache("another salt", clock=clock).key_for("alice@example.com", password) != key


def test_empty_salt_is_random_per_process_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="relate_smtp.auth"):
        first = ResultCache("")
        second = ResultCache("")
    assert first.salt_is_ephemeral and second.salt_is_ephemeral
    assert not ResultCache(SALT).salt_is_ephemeral
    assert first.key_for("a@b.c", "k") != second.key_for("a@b.c", "k")
    assert "Security:AuthenticationSalt" in caplog.text


def test_cache_is_bounded_and_refuses_undecided_results() -> None:
    clock = FakeClock()
    cache = ResultCache(SALT, clock=clock, max_entries=3)
    keys = [cache.key_for(f"user{i}@example.com", "pw") for i in range(5)]
    for key in keys:
        cache.put(key, CachedResult(outcome=AuthOutcome.FAILED))
    assert len(cache) == 3
    assert cache.get(keys[0]) is None
    assert cache.get(keys[4]) is not None
    with pytest.raises(ValueError):
        CachedResult(outcome=AuthOutcome.TEMPORARY)
    with pytest.raises(ValueError):
        CachedResult(outcome=AuthOutcome.SUCCESS)


async def test_passwords_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    with caplog.at_level(logging.DEBUG, logger="relate_smtp.auth"):
        await h.login()
        await h.login(password="wrong-secret-value", ip=OTHER_IP)
        await h.login(password="wrong-secret-value", ip=OTHER_IP)
    assert "alice@example.com" in caplog.text
    assert h.raw not in caplog.text
    assert "wrong-secret-value" not in caplog.text


# --- LastUsedAt ---------------------------------------------------------------------


async def test_last_used_updates_are_batched_coalesced_and_drained_on_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    updater = LastUsedUpdater(store, capacity=16, min_interval=0)
    first, second = uuid.uuid4(), uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            await trio.testing.wait_all_tasks_blocked()
            assert updater.enqueue(first, NOW)
            assert updater.enqueue(second, NOW)
            assert updater.enqueue(first, NOW + timedelta(seconds=5))
            assert updater.enqueue(first, NOW + timedelta(seconds=1))
            updater.close()
    assert store.touched == [{first: NOW + timedelta(seconds=5), second: NOW}]
    assert updater.written == 2


async def test_a_key_used_again_soon_is_not_written_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    now = [100.0]
    updater = LastUsedUpdater(store, capacity=16, min_interval=60, clock=lambda: now[0])
    key = uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            assert updater.enqueue(key, NOW)
            await trio.testing.wait_all_tasks_blocked()
            now[0] += 59
            assert updater.enqueue(key, NOW + timedelta(seconds=59))
            await trio.testing.wait_all_tasks_blocked()
            now[0] += 2
            assert updater.enqueue(key, NOW + timedelta(seconds=61))
            updater.close()
    assert store.touched == [{key: NOW}, {key: NOW + timedelta(seconds=61)}]
    assert updater.skipped == 1


async def test_last_used_run_flushes_what_was_queued_before_it_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    updater = LastUsedUpdater(store, capacity=16, batch_size=2, min_interval=0)
    keys = [uuid.uuid4() for _ in range(5)]
    for key in keys:
        assert updater.enqueue(key, NOW)
    await updater.aclose()
    with trio.fail_after(5):
        await updater.run()
    assert [len(batch) for batch in store.touched] == [2, 2, 1]
    assert {k for batch in store.touched for k in batch} == set(keys)
    assert updater.enqueue(uuid.uuid4(), NOW) is False


def test_last_used_queue_is_bounded_and_drops_when_full() -> None:
    updater = LastUsedUpdater(FakeStore(), capacity=2, min_interval=0)
    assert updater.enqueue(uuid.uuid4(), NOW)
    assert updater.enqueue(uuid.uuid4(), NOW)
    assert updater.enqueue(uuid.uuid4(), NOW) is False
    assert updater.dropped == 1


async def test_authentication_never_waits_for_a_full_last_used_queue() -> None:
    h = Harness(queue_capacity=1)
    for ip in (IP, OTHER_IP, "203.0.113.1"):
        assert await h.login(ip=ip) is AuthOutcome.SUCCESS
    assert h.updater.dropped == 2


async def test_last_used_store_errors_are_logged_not_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore()
    store.touch_unavailable = True
    updater = LastUsedUpdater(store, capacity=16, min_interval=0)
    failing, later = uuid.uuid4(), uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            updater.enqueue(failing, NOW)
            await trio.testing.wait_all_tasks_blocked()
            store.touch_unavailable = False
            updater.enqueue(later, NOW)
            updater.close()
    assert store.calls["touch_api_keys"] == 2
    assert store.touched == [{later: NOW}]
    assert updater.failed_batches == 1
    assert "Could not update LastUsedAt" in caplog.text


async def test_aclose_waits_until_queued_updates_are_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class SlowStore(FakeStore):
        async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
            await trio.sleep(0.2)
            await super().touch_api_keys(last_used)

    store = SlowStore()
    updater = LastUsedUpdater(store, capacity=16, batch_size=1, min_interval=0)
    keys = [uuid.uuid4() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(updater.run)
        for key in keys:
            assert updater.enqueue(key, NOW)
        await updater.aclose()
        assert updater.written == 3
        assert [set(batch) for batch in store.touched] == [{key} for key in keys]


async def test_parallel_attempts_from_one_ip_cannot_outrun_the_lockout() -> None:
    h = Harness(security(max_failed_attempts=5))
    outcomes: list[AuthOutcome] = []

    async def attempt(n: int) -> None:
        outcomes.append(await h.login(password=f"wrong-{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(attempt, n)
    assert outcomes.count(AuthOutcome.FAILED) == 5
    assert outcomes.count(AuthOutcome.BLOCKED) == 45
    assert h.verify.calls <= 5
