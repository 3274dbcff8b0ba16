"""Concurrent-session limits, overall and per client (IPv4 address or IPv6 prefix)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from relate_smtp.config import IPNetwork
from relate_smtp.runtime.limits import ConnectionLimiter


def limiter(
    *,
    max_total: int = 100,
    max_per_ip: int = 2,
    exempt: Sequence[IPNetwork] = (),
    ipv6_prefix_length: int = 64,
) -> ConnectionLimiter:
    return ConnectionLimiter(
        max_total=max_total,
        max_per_ip=max_per_ip,
        exempt=exempt,
        ipv6_prefix_length=ipv6_prefix_length,
    )


def test_ipv6_clients_of_one_64_share_the_per_ip_limit() -> None:
    limits = limiter()
    assert limits.try_acquire("2001:db8:1:2::1")
    assert limits.try_acquire("2001:db8:1:2::2")
    assert not limits.try_acquire("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert limits.try_acquire("2001:db8:1:3::1")  # the next /64 is another client
    limits.release("2001:db8:1:2::1")
    assert limits.try_acquire("2001:db8:1:2::3")
    assert limits.total == 3


def test_ipv4_clients_are_limited_per_address_in_either_spelling() -> None:
    limits = limiter()
    assert limits.try_acquire("192.0.2.10")
    assert limits.try_acquire("::ffff:192.0.2.10")
    assert not limits.try_acquire("192.0.2.10")
    assert limits.try_acquire("192.0.2.11")


def test_the_prefix_length_is_configurable() -> None:
    limits = limiter(ipv6_prefix_length=128)
    for n in range(1, 5):
        assert limits.try_acquire(f"2001:db8::{n}")
    wide = limiter(ipv6_prefix_length=48)
    assert wide.try_acquire("2001:db8:0:1::1")
    assert wide.try_acquire("2001:db8:0:2::1")
    assert not wide.try_acquire("2001:db8:0:3::1")


def test_exemption_is_judged_on_the_real_address_and_uses_no_share() -> None:
    limits = limiter(exempt=(ipaddress.ip_network("2001:db8::5/128"),))
    for _ in range(5):
        assert limits.try_acquire("2001:db8::5")
    # The exempt host's sessions do not count against its /64 neighbours…
    assert limits.try_acquire("2001:db8::6")
    assert limits.try_acquire("2001:db8::7")
    # …and the neighbours are not exempt for sharing its /64.
    assert not limits.try_acquire("2001:db8::8")
    for _ in range(5):
        limits.release("2001:db8::5")
    assert not limits.try_acquire("2001:db8::8")
    assert limits.total == 2


def test_zero_means_no_per_ip_limit_but_the_total_still_applies() -> None:
    limits = limiter(max_total=3, max_per_ip=0)
    assert all(limits.try_acquire("2001:db8::1") for _ in range(3))
    assert not limits.try_acquire("2001:db8:9::1")
