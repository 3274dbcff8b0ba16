"""Client addresses: one spelling for an IPv4 client, and network membership.

A dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``; limits, the rate
limiter, logs and trust checks must all see it as ``a.b.c.d``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from relate_smtp.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """``address``, with an IPv4-mapped IPv6 address given as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def plain_address(ip: str) -> str:
    """The one spelling of a client address (unparsable text is returned as it is)."""
    try:
        return str(unmapped(ipaddress.ip_address(ip)))
    except ValueError:
        return ip


def in_networks(ip: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``ip`` (in either spelling) lies in one of ``networks``; an unparsable
    address is in none. Versions are compared first: ``ipaddress`` does not."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    candidates = {address, unmapped(address)}
    return any(
        candidate.version == network.version and candidate in network
        for network in networks
        for candidate in candidates
    )
