"""API keys: generation, bcrypt hashes as the platform's BCrypt.Net makes and checks them
($2a, $2b, $2y, the 72-byte cut), and the SMTP scope."""

from __future__ import annotations

import bcrypt
import pytest

from relate_smtp.handlers.apikeys import (
    generate_api_key,
    has_smtp_scope,
    hash_api_key,
    key_prefix,
    verify_api_key,
)
from tests.handlers.helpers import FAST_COST

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
