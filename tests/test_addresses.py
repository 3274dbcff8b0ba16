"""Client addresses: the group per-client limits count under."""

from __future__ import annotations

import pytest

from relate_smtp.addresses import client_group


@pytest.mark.parametrize(
    ("ip", "prefix_length", "group"),
    [
        ("192.0.2.10", 64, "192.0.2.10"),
        ("::ffff:192.0.2.10", 64, "192.0.2.10"),  # IPv4-mapped: the IPv4 client itself
        ("::ffff:192.0.2.10", 8, "192.0.2.10"),  # the IPv6 prefix never applies to IPv4
        ("2001:db8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::7", 128, "2001:db8:1:2::7/128"),
        ("2001:db8:1:2::7", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2::7", 1, "::/1"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not an address", 64, "not an address"),
    ],
)
def test_client_group(ip: str, prefix_length: int, group: str) -> None:
    assert client_group(ip, prefix_length) == group
