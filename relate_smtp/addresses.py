"""Client addresses: one spelling for an IPv4 client, network membership, and the group
that per-client limits count under.

A dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``; limits, the rate
limiter, logs and trust checks must all see it as ``a.b.c.d``.

An IPv6 client is not one address: a site is given at least a /64 (RFC 6177), and any
host on it can take fresh addresses at will (SLAAC privacy addresses, RFC 8981). Limits
that counted per address would let one client look like 2**64, so they count per
prefix instead (:func:`client_group`).

A leaf beside ``listener_kind``: the runtime (limits, PROXY trust, logs) and the
handlers (the AUTH rate limiter) both need these rules, and neither may own them for
the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relate_smtp.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """``address``, with an IPv4-mapped IPv6 address given as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_group(ip: str, ipv6_prefix_length: int) -> str:
    """The key per-client limits count under: an IPv4 address (mapped or not) as itself,
    an IPv6 address as its ``/ipv6_prefix_length`` network (``2001:db8::/64``).

    Unparsable text is its own group, so it can only limit itself.
    """
    try:
        address = unmapped(ipaddress.ip_address(ip))
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    # A zone (fe80::1%eth0) names a link, not part of the address: drop it.
    network = ipaddress.IPv6Network((address.packed, ipv6_prefix_length), strict=False)
    return str(network)


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
