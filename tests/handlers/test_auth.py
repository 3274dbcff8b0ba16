"""The authenticator: lookups, the result cache, rate limiting and store failures.

The store is an in-memory fake with call counters, so each test can say exactly which
queries an AUTH made. Time is a fake monotonic clock moved by hand; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import bcrypt
import pytest
import trio
import trio.testing

from relate_smtp.handlers.apikeys import generate_api_key, hash_api_key, verify_api_key
from relate_smtp.handlers.auth import (
    KEYS_VERIFIED_PER_ATTEMPT,
    Authenticator,
    AuthOutcome,
    CachedResult,
    ResultCache,
)
from relate_smtp.storage import ApiKey, StoreUnavailable, User
from tests.handlers.helpers import (
    ALICE,
    CREATED,
    FAST_COST,
    IP,
    MALLORY,
    NOW,
    OTHER_IP,
    SALT,
    FakeClock,
    FakeStore,
    Harness,
    security,
)


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
