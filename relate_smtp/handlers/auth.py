"""AUTH decisions: API keys checked against the store, with a rate limiter and a result cache.

SPEC §3 is the authority. The session hands :meth:`Authenticator.authenticate` the
SASL username and password and the client IP, and turns the :class:`AuthOutcome` into a
reply (SUCCESS → 235 2.7.0, FAILED → 535 5.7.8, BLOCKED and TEMPORARY → 454 4.7.0).
Raw passwords are never logged or kept; usernames may be logged.

``LastUsedAt`` is written by :class:`~relate_smtp.handlers.lastused.LastUsedUpdater`, a
background task fed through a bounded channel, so a slow database never delays an AUTH
reply. The runtime counts attempts and failures from the returned :class:`AuthResult`.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import attrs
import trio

from relate_smtp.config import SecuritySettings, SmtpSettings
from relate_smtp.handlers.apikeys import has_smtp_scope, key_prefix, verify_api_key
from relate_smtp.handlers.lastused import LastUsedUpdater
from relate_smtp.handlers.ratelimit import RateLimiter
from relate_smtp.storage import ApiKey, Store, StoreError

__all__ = [
    "CACHE_TTL_SECONDS",
    "KEYS_VERIFIED_PER_ATTEMPT",
    "AuthOutcome",
    "AuthResult",
    "Authenticator",
    "CachedResult",
    "ResultCache",
]

logger = logging.getLogger("relate_smtp.auth")

# SPEC §3: long enough that a client logging in for every message pays bcrypt about
# once per burst, short enough that a revoked key stops working within half a minute.
CACHE_TTL_SECONDS = 30.0

# Distinct credentials seen within one TTL; failures are cached too, so a password
# spray fills it, and the cap keeps that to a few MB.
DEFAULT_CACHE_ENTRIES = 10_000

# A bcrypt hash at BCrypt.Net's default cost (11) of a random string nobody knows.
# Verified against in place of missing candidates, so that an unknown user, or a user
# with no SMTP key, takes as long to refuse as a wrong key (no address enumeration by
# timing).
_DUMMY_HASH = "$2b$11$NzSc8mjaxyTngWOoPCKUoOsXmXqvX3sCmhjsfCGkxiBxa6xTqjr.C"

# bcrypt verifications per uncached attempt that fails, whoever the user is: its keys
# first, padded with the dummy hash. Were it "one per candidate key", the time to
# refuse would tell who exists and how many older (null KeyPrefix) keys they have. One
# is the cost of an unknown user anyway, so refusing never costs more than it used to.
# The price: a user with several older keys can log in with only one of them (the
# most recently used; see _keys_to_try) until the others are re-issued with a prefix.
KEYS_VERIFIED_PER_ATTEMPT = 1

# Sorts a never-used key after every used one.
_NEVER = float("-inf")


class AuthOutcome(enum.Enum):
    SUCCESS = "success"
    """The key is valid: 235 2.7.0."""
    FAILED = "failed"
    """Unknown user, wrong key, revoked key or no smtp scope: 535 5.7.8; counted."""
    BLOCKED = "blocked"
    """The client IP is in backoff or locked out: 454 4.7.0; the store was not asked."""
    TEMPORARY = "temporary"
    """The store failed: 454 4.7.0; neither counted nor cached."""


@attrs.frozen(kw_only=True)
class AuthResult:
    """What :meth:`Authenticator.authenticate` decided.

    ``user_id`` and ``address`` (the login, lower-cased) are set on SUCCESS only;
    ``retry_after`` (seconds) on BLOCKED only.
    """

    outcome: AuthOutcome
    user_id: uuid.UUID | None = None
    address: str | None = None
    retry_after: float | None = None


@attrs.frozen(kw_only=True)
class CachedResult:
    """A definite result worth remembering: SUCCESS (with the user and key) or FAILED."""

    outcome: AuthOutcome
    user_id: uuid.UUID | None = None
    key_id: uuid.UUID | None = None

    def __attrs_post_init__(self) -> None:
        if self.outcome is AuthOutcome.SUCCESS:
            if self.user_id is None or self.key_id is None:
                raise ValueError("a cached SUCCESS needs the user and key ids")
        elif self.outcome is not AuthOutcome.FAILED:
            raise ValueError(f"only SUCCESS and FAILED are cached, not {self.outcome.name}")


_FAILED = CachedResult(outcome=AuthOutcome.FAILED)


class ResultCache:
    """Recent SUCCESS and FAILED results, keyed by HMAC-SHA256(salt, ``email:password``).

    The key is the only trace of the password and, without the salt, cannot be tested
    against guesses. An empty ``salt`` means a random one for this process
    (``salt_is_ephemeral``): the cache still works, but a key derived here means nothing
    to another process, which is fine as the cache is never shared. Entries live ``ttl``
    seconds from when they were stored, so insertion order is expiry order and expired
    entries are swept from the front in O(1) amortised time.
    """

    def __init__(
        self,
        salt: str,
        *,
        ttl: float = CACHE_TTL_SECONDS,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.salt_is_ephemeral = not salt
        if self.salt_is_ephemeral:
            logger.warning(
                "Security:AuthenticationSalt is empty; using a random salt for this process"
            )
            self._salt = secrets.token_bytes(32)
        else:
            self._salt = salt.encode("utf-8")
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        # key → (result, expiry on the monotonic clock)
        self._entries: OrderedDict[bytes, tuple[CachedResult, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key_for(self, email: str, password: str) -> bytes:
        """The cache key for a login; the address is lower-cased as it is matched that way.

        A colon inside the username makes ``email:password`` ambiguous, but reaching a
        real user's entry that way needs that user's key, so it cannot be abused.
        """
        message = f"{email.lower()}:{password}".encode("utf-8", "surrogatepass")
        return hmac.digest(self._salt, message, "sha256")

    def get(self, key: bytes) -> CachedResult | None:
        """The unexpired result stored under ``key``, if any."""
        self._sweep(self._clock())
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: bytes, result: CachedResult) -> None:
        """Remember ``result`` for ``ttl`` seconds."""
        now = self._clock()
        self._entries.pop(key, None)
        self._entries[key] = (result, now + self._ttl)
        self._sweep(now)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _sweep(self, now: float) -> None:
        while self._entries:
            key, (_, expires_at) = next(iter(self._entries.items()))
            if now < expires_at:
                break
            del self._entries[key]


@attrs.define
class _InFlight:
    """One verification under way, shared by identical concurrent attempts."""

    done: trio.Event = attrs.Factory(trio.Event)
    result: CachedResult | None = None


def _keys_to_try(
    user_id: uuid.UUID, candidates: Sequence[ApiKey], prefix: str
) -> tuple[list[ApiKey], int]:
    """The eligible keys worth a bcrypt, at most :data:`KEYS_VERIFIED_PER_ATTEMPT` of
    them, and how many eligible older keys were left out.

    Ineligible rows are skipped before paying for bcrypt. The store already leaves out
    revoked keys and other users' keys; they are checked again here so that a store bug
    cannot let one in. Prefix-matched keys come first (the prefix all but names the
    key), then older keys, most recently used first, then newest: the key a client is
    actually using stays the one tried, and the order never depends on the attempt.
    """
    by_prefix: list[ApiKey] = []
    older: list[ApiKey] = []
    for key in candidates:
        if key.revoked_at is not None or key.user_id != user_id:
            continue
        if not has_smtp_scope(key.scopes):
            continue
        if key.key_prefix is None:
            older.append(key)
        elif key.key_prefix == prefix:
            by_prefix.append(key)
    older.sort(key=_recency, reverse=True)
    chosen = (by_prefix + older)[:KEYS_VERIFIED_PER_ATTEMPT]
    left_out = sum(1 for key in older if key not in chosen)
    return chosen, left_out


def _recency(key: ApiKey) -> tuple[float, float, int]:
    last_used = key.last_used_at.timestamp() if key.last_used_at is not None else _NEVER
    return last_used, key.created_at.timestamp(), key.id.int


def _may_act_as(username: str, authorization_id: str) -> bool:
    """Whether a login may use this SASL authorization identity (RFC 4616 §2).

    Relate has no proxy authorization: only an empty authzid or the login itself,
    compared case-insensitively as logins are matched, is allowed. No password is
    tested, so a refusal here is neither rate limited nor cached.
    """
    return not authorization_id or authorization_id.lower() == username.lower()


def _default_thread_limit() -> int:
    # bcrypt releases the GIL, so one thread per core uses the machine without letting a
    # burst of AUTHs queue hundreds of threads.
    return max(2, os.cpu_count() or 2)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Authenticator:
    """Checks AUTH credentials (SPEC §3) for every session of one server process.

    Order of work, cheapest first: the IP's rate limit (a blocked IP costs nothing and
    touches nothing) → the result cache → the store (user, then candidate keys) → bcrypt
    in a worker thread, bounded by ``limiter``. ``clock`` (monotonic seconds) drives the
    rate limiter and the cache; ``wall_clock`` stamps ``LastUsedAt``. ``rate_limiter`` and
    ``cache`` may be passed in (tests, or several listeners sharing one); otherwise they
    are built from ``settings``, grouping IPv6 clients by ``ipv6_prefix_length``.
    Without ``last_used`` no ``LastUsedAt`` is written. ``dummy_hash`` pads the bcrypt
    work of a refusal (:data:`KEYS_VERIFIED_PER_ATTEMPT`); its cost should be that of the
    real keys, BCrypt.Net's 11 by default, and tests pass a cheaper one with cheap keys.
    """

    def __init__(
        self,
        store: Store,
        settings: SecuritySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
        limiter: trio.CapacityLimiter | None = None,
        rate_limiter: RateLimiter | None = None,
        cache: ResultCache | None = None,
        last_used: LastUsedUpdater | None = None,
        verify: Callable[[str, str], bool] = verify_api_key,
        ipv6_prefix_length: int = SmtpSettings().client_ipv6_prefix_length,
        dummy_hash: str = _DUMMY_HASH,
    ) -> None:
        self._store = store
        self._wall_clock = wall_clock
        self._limiter = (
            limiter if limiter is not None else trio.CapacityLimiter(_default_thread_limit())
        )
        self.rate_limiter = (
            rate_limiter
            if rate_limiter is not None
            else RateLimiter(
                settings.rate_limit, clock=clock, ipv6_prefix_length=ipv6_prefix_length
            )
        )
        self.cache = (
            cache if cache is not None else ResultCache(settings.authentication_salt, clock=clock)
        )
        self._last_used = last_used
        self._verify = verify
        self._dummy_hash = dummy_hash
        self._inflight: dict[bytes, _InFlight] = {}

    async def authenticate(
        self, username: str, password: str, client_ip: str, *, authorization_id: str = ""
    ) -> AuthResult:
        """Decide an AUTH attempt; never raises for bad input or a failing store.

        ``authorization_id`` is the SASL authzid (RFC 4616 §2): a user may only act as
        itself, so one naming anybody else is refused without looking at the password.
        """
        retry_after = self.rate_limiter.retry_after(client_ip)
        if retry_after is not None:
            # Debug, not info: a client hammering a blocked server must not flood the log.
            logger.debug(
                "AUTH from %s refused for %.1f s (rate limit), user %r",
                client_ip,
                retry_after,
                username,
            )
            return AuthResult(outcome=AuthOutcome.BLOCKED, retry_after=retry_after)
        if not _may_act_as(username, authorization_id):
            logger.info(
                "AUTH for %r from %s refused: may not act as %r",
                username,
                client_ip,
                authorization_id,
            )
            return AuthResult(outcome=AuthOutcome.FAILED)

        cache_key = self.cache.key_for(username, password)
        cached = self.cache.get(cache_key)
        if cached is not None:
            return self._conclude(username, client_ip, cached, cache_key=None)

        # Single flight: a client opening many connections at once with the same
        # credentials waits for one bcrypt instead of paying for one each.
        inflight = self._inflight.get(cache_key)
        if inflight is not None:
            await inflight.done.wait()
            if inflight.result is None:
                return AuthResult(outcome=AuthOutcome.TEMPORARY)
            return self._conclude(username, client_ip, inflight.result, cache_key=None)
        if not self.rate_limiter.reserve(client_ip):
            return AuthResult(outcome=AuthOutcome.BLOCKED)
        inflight = _InFlight()
        self._inflight[cache_key] = inflight
        try:
            inflight.result = await self._check_credentials(username, password, client_ip)
        finally:
            del self._inflight[cache_key]
            inflight.done.set()
            self.rate_limiter.release(client_ip)
        if inflight.result is None:
            return AuthResult(outcome=AuthOutcome.TEMPORARY)
        return self._conclude(username, client_ip, inflight.result, cache_key=cache_key)

    async def _check_credentials(
        self, username: str, password: str, client_ip: str
    ) -> CachedResult | None:
        """Look the user and keys up and run bcrypt; None when the store failed."""
        try:
            user = await self._store.find_user_by_address(username)
            # SPEC §3: the login is the user's primary address (Users.Email); an
            # additional address delivers mail but does not log in.
            if user is not None and user.email.lower() != username.lower():
                user = None
            candidates: Sequence[ApiKey] = ()
            if user is not None:
                candidates = await self._store.candidate_api_keys(user.id, key_prefix(password))
        except StoreError as exc:
            logger.warning("AUTH for %r from %s: store unavailable: %s", username, client_ip, exc)
            return None

        if user is None:
            await self._pad_verifications(password, KEYS_VERIFIED_PER_ATTEMPT)
            return _FAILED
        matched = await self._find_matching_key(username, user.id, candidates, password)
        if matched is None:
            return _FAILED
        return CachedResult(outcome=AuthOutcome.SUCCESS, user_id=user.id, key_id=matched.id)

    async def _find_matching_key(
        self, username: str, user_id: uuid.UUID, candidates: Sequence[ApiKey], password: str
    ) -> ApiKey | None:
        """The key among :func:`_keys_to_try` whose hash matches, if any.

        A refusal always costs :data:`KEYS_VERIFIED_PER_ATTEMPT` verifications, the
        missing ones made against the dummy hash. A success may stop early: it is no
        secret from the one client that can cause it.
        """
        chosen, left_out = _keys_to_try(user_id, candidates, key_prefix(password))
        for key in chosen:
            if await self._run_verify(password, key.key_hash):
                return key
        await self._pad_verifications(password, KEYS_VERIFIED_PER_ATTEMPT - len(chosen))
        if left_out:
            logger.warning(
                "AUTH for %r: %d older keys without KeyPrefix were not checked (%d key "
                "per attempt, the most recently used first); issue new keys to replace them",
                username,
                left_out,
                KEYS_VERIFIED_PER_ATTEMPT,
            )
        return None

    async def _pad_verifications(self, password: str, count: int) -> None:
        for _ in range(count):
            await self._run_verify(password, self._dummy_hash)

    async def _run_verify(self, password: str, key_hash: str) -> bool:
        return await trio.to_thread.run_sync(
            self._verify, password, key_hash, limiter=self._limiter
        )

    def _conclude(
        self, username: str, client_ip: str, result: CachedResult, *, cache_key: bytes | None
    ) -> AuthResult:
        """Act on a definite result: rate limiter, cache (unless it came from there), LastUsedAt."""
        if cache_key is not None:
            self.cache.put(cache_key, result)
        if result.outcome is not AuthOutcome.SUCCESS or result.key_id is None:
            self.rate_limiter.record_failure(client_ip, username)
            logger.info("AUTH failed for %r from %s", username, client_ip)
            return AuthResult(outcome=AuthOutcome.FAILED)
        self.rate_limiter.record_success(client_ip, username)
        if self._last_used is not None:
            self._last_used.enqueue(result.key_id, self._wall_clock())
        logger.info("AUTH succeeded for %r from %s", username, client_ip)
        return AuthResult(
            outcome=AuthOutcome.SUCCESS, user_id=result.user_id, address=username.lower()
        )
