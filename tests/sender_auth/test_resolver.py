"""The cached Trio resolver: TTLs, negative answers, TCP fallback, trouble as an error."""

from __future__ import annotations

import pytest

from relate_smtp.sender_auth import DnsTemporaryError, NameServer, Resolver
from relate_smtp.sender_auth._resolver import txt_strings

from .dns_server import DnsServer


def make(server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver.create((NameServer(address="127.0.0.1", port=server.port),), timeout=timeout)


async def test_answer_is_cached_within_its_ttl(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    dns_server.txt("cached.example", "first", ttl=300)
    first = await resolver.lookup("cached.example", "TXT")
    dns_server.txt("cached.example", "second", ttl=300)

    again = await resolver.lookup("cached.example", "TXT")

    assert txt_strings(first) == txt_strings(again) == (b"first",)
    assert dns_server.count("cached.example", "TXT") == 1


async def test_answer_is_asked_again_once_its_ttl_is_over(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    dns_server.txt("fresh.example", "first", ttl=0)
    await resolver.lookup("fresh.example", "TXT")
    dns_server.txt("fresh.example", "second", ttl=0)

    again = await resolver.lookup("fresh.example", "TXT")

    assert txt_strings(again) == (b"second",)
    assert dns_server.count("fresh.example", "TXT") == 2


async def test_nxdomain_is_cached_for_the_soa_negative_ttl(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    first = await resolver.lookup("missing.example", "TXT")
    await resolver.lookup("missing.example", "TXT")

    assert first.nxdomain and first.records == ()
    assert dns_server.count("missing.example", "TXT") == 1


async def test_negative_answer_with_zero_ttl_is_not_kept(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    dns_server.negative_ttl = 0
    await resolver.lookup("missing.example", "TXT")
    dns_server.txt("missing.example", "now here")

    again = await resolver.lookup("missing.example", "TXT")

    assert txt_strings(again) == (b"now here",)


async def test_large_answer_comes_over_tcp(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    big = [f"record {n} " + "x" * 200 for n in range(12)]
    dns_server.txt("big.example", *big)

    answer = await resolver.lookup("big.example", "TXT")

    assert sorted(txt_strings(answer)) == sorted(text.encode() for text in big)
    assert dns_server.tcp_queries == 1


async def test_servfail_is_a_temporary_error_and_not_cached(dns_server: DnsServer) -> None:
    resolver = make(dns_server)
    dns_server.servfail("broken.example")
    with pytest.raises(DnsTemporaryError):
        await resolver.lookup("broken.example", "TXT")
    with pytest.raises(DnsTemporaryError):
        await resolver.lookup("broken.example", "TXT")

    assert dns_server.count("broken.example", "TXT") == 2


async def test_silence_is_a_temporary_error_after_the_timeout(
    dns_server: DnsServer, autojump_clock: object
) -> None:
    resolver = make(dns_server, timeout=5)
    dns_server.silent("slow.example")

    with pytest.raises(DnsTemporaryError, match="within 5s"):
        await resolver.lookup("slow.example", "TXT")


async def test_malformed_name_is_nonexistent(dns_server: DnsServer) -> None:
    resolver = make(dns_server)

    answer = await resolver.lookup("a" * 64 + ".example", "TXT")

    assert answer.nxdomain
    assert dns_server.queries == []
