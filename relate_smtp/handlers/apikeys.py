"""API keys: making raw keys, hashing and verifying them the way the Relate platform does.

The platform stores ``SmtpApiKeys.KeyHash`` with BCrypt.Net and ``KeyPrefix`` as the first
12 characters of the raw key (SPEC §3, §8). Everything here is synchronous and CPU-bound:
callers on the event loop run :func:`verify_api_key` and :func:`hash_api_key` through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import secrets

import bcrypt

__all__ = [
    "DEFAULT_COST",
    "KEY_PREFIX_LENGTH",
    "RAW_KEY_MARKER",
    "generate_api_key",
    "has_smtp_scope",
    "hash_api_key",
    "key_prefix",
    "verify_api_key",
]

# The platform's column holds the first 12 characters of the raw key (SPEC §8).
KEY_PREFIX_LENGTH = 12

# BCrypt.Net's default work factor, so keys made by the CLI cost what the platform's do.
DEFAULT_COST = 11

# Marks a string as a Relate SMTP key, so a leaked one is recognisable (secret scanners,
# log review) and cannot be mistaken for an ordinary password.
RAW_KEY_MARKER = "rsk_"

# 32 random bytes = 256 bits of entropy; token_urlsafe renders them as 43 characters.
_KEY_ENTROPY_BYTES = 32

# bcrypt reads at most 72 bytes of the password. BCrypt.Net silently ignores the rest;
# the bcrypt package (≥ 5.0) raises instead, so the cut is made here to keep old keys
# longer than that verifying as they do on the platform.
_BCRYPT_MAX_PASSWORD_BYTES = 72

# "$2y$" (PHP's name) is the same algorithm as "$2b$". "$2x$" is deliberately absent: it
# names the sign-extension bug of old crypt_blowfish, which the bcrypt package does not
# reproduce, so accepting it would verify non-ASCII keys wrongly.
_ACCEPTED_VARIANTS = (b"$2a$", b"$2b$")
_ALIASED_VARIANTS = {b"$2y$": b"$2b$"}


def generate_api_key() -> str:
    """A new raw key: ``rsk_`` followed by 256 random bits, URL-safe base64.

    URL-safe characters survive SASL, shell quoting and configuration files unescaped;
    the first :data:`KEY_PREFIX_LENGTH` characters still carry 48 random bits, enough for
    the prefix lookup to select about one key.
    """
    return RAW_KEY_MARKER + secrets.token_urlsafe(_KEY_ENTROPY_BYTES)


def key_prefix(raw: str) -> str:
    """The value stored in ``KeyPrefix`` and used to find a key: its first 12 characters."""
    return raw[:KEY_PREFIX_LENGTH]


def _password_bytes(raw: str) -> bytes:
    """The bytes bcrypt sees: UTF-8 (as BCrypt.Net encodes), cut at 72 bytes.

    ``surrogatepass`` makes every ``str`` encodable, so odd input from a client can only
    fail to verify, never raise.
    """
    return raw.encode("utf-8", "surrogatepass")[:_BCRYPT_MAX_PASSWORD_BYTES]


def hash_api_key(raw: str, *, cost: int = DEFAULT_COST) -> str:
    """A ``$2b$`` bcrypt hash of ``raw`` for ``KeyHash``; BCrypt.Net verifies it too."""
    salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
    return bcrypt.hashpw(_password_bytes(raw), salt).decode("ascii")


def verify_api_key(raw: str, key_hash: str) -> bool:
    """Whether ``raw`` matches ``key_hash`` (``$2a$``, ``$2b$`` or ``$2y$``, any cost).

    A malformed or unsupported hash is a non-match, not an error: one bad row in the
    database must not turn an AUTH into a crash.
    """
    try:
        hashed = key_hash.encode("ascii")
    except UnicodeEncodeError:
        return False
    alias = _ALIASED_VARIANTS.get(hashed[:4])
    if alias is not None:
        hashed = alias + hashed[4:]
    if not hashed.startswith(_ACCEPTED_VARIANTS):
        return False
    try:
        return bcrypt.checkpw(_password_bytes(raw), hashed)
    except ValueError:
        return False


def has_smtp_scope(scopes_json: str) -> bool:
    """Whether the ``Scopes`` column (a JSON array of strings) grants ``smtp``.

    The comparison ignores case, as the SPEC requires. Text that is not such an array is
    treated as granting nothing. JSON ``null`` entries are skipped, as they are when the
    platform reads the column into a list of strings; any other non-string entry makes
    the whole value malformed.
    """
    try:
        scopes = json.loads(scopes_json)
    except (ValueError, TypeError, RecursionError):
        return False
    if not isinstance(scopes, list):
        return False
    granted = False
    for scope in scopes:
        if scope is None:
            continue
        if not isinstance(scope, str):
            return False
        if scope.casefold() == "smtp":
            granted = True
    return granted
