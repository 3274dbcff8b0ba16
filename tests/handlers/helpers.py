"""Helpers for the authentication tests: an in-memory store with call counters, a fake
monotonic clock moved by hand, a counting verifier, and ``Harness``: an authenticator
over them with one user, ``alice``, and her SMTP key. Hashes use bcrypt cost 4 unless a
test is about the hash format."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import trio
import trio.testing

from relate_smtp.config import RateLimitSettings, SecuritySettings
from relate_smtp.handlers.apikeys import generate_api_key, hash_api_key, key_prefix, verify_api_key
from relate_smtp.handlers.auth import Authenticator, AuthOutcome
from relate_smtp.handlers.lastused import LastUsedUpdater
from relate_smtp.storage import ApiKey, NewEmail, PoolStats, SavedEmail, StoreUnavailable, User

FAST_COST = 4
SALT = "test-salt"
IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
CREATED = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


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
