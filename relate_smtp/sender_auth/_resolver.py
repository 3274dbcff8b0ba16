"""A Trio-native stub resolver with a bounded, TTL-honouring cache.

dnspython's asynchronous resolver runs on Trio itself (its backend is chosen through
sniffio), so no lookup blocks the event loop or needs a thread. Its ``LRUCache`` keeps
each answer, positive or negative, for the TTL the answer carried (RFC 1035 §3.2.1,
RFC 2308 §5) and holds at most ``CACHE_ENTRIES`` of them.

Every failure that says nothing about the record (timeout, SERVFAIL, REFUSED, network
error) becomes ``DnsTemporaryError``: the callers turn it into ``temperror``, never into
a refusal.
"""

from __future__ import annotations

import functools
import math
import time

import attrs
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import trio
from dns.rdtypes.txtbase import TXTBase

from ._settings import NameServer
from ._ttlcache import TtlCache

#: A few thousand answers cover the senders of a busy MX between TTL expiries while
#: bounding memory (each entry is one small DNS message).
CACHE_ENTRIES = 4096
#: RFC 1536 §1 and dnspython's default: a UDP query unanswered this long is sent again.
RETRANSMIT_SECONDS = 2.0


class DnsTemporaryError(Exception):
    """The lookup could not be completed; the record's existence is unknown."""


@attrs.frozen(kw_only=True)
class DnsAnswer:
    """The records found for one (name, type); empty for NXDOMAIN and NODATA."""

    records: tuple[dns.rdata.Rdata, ...]
    nxdomain: bool = False
    #: When the answer's TTL runs out (``time.time()`` clock, as dnspython's cache);
    #: what is derived from it is good until then. A malformed name never expires.
    expires: float = math.inf


class Resolver:
    """Looks names up through the configured servers, or the system's if none."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        timeout: float,
    ) -> None:
        self._resolver = resolver
        self._timeout = timeout
        self._answers: TtlCache[tuple[str, str], DnsAnswer] = TtlCache(CACHE_ENTRIES)

    @classmethod
    def create(
        cls,
        servers: tuple[NameServer, ...],
        *,
        timeout: float,
        cache_entries: int = CACHE_ENTRIES,
    ) -> Resolver:
        """Build a resolver; with no servers this reads the system configuration once."""
        resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(server.address, server.port) for server in servers
            ]
        resolver.cache = dns.resolver.LRUCache(cache_entries)
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, RETRANSMIT_SECONDS)
        return cls(resolver, timeout=timeout)

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The answer the cache holds now (within its TTL), else None; no I/O.

        Most mail comes from senders seen minutes ago: their answers are here, and
        reading them directly skips a resolution's machinery, or a thread hop for SPF.
        The keys are dnspython's own (its NXDOMAIN answers are kept under type ANY). An
        answer read once is also kept by the text of its name until it expires, which
        spares hashing a ``dns.name.Name`` (label by label) on every read.
        """
        known = self._answers.get((name, rdtype))
        if known is not None:
            return known
        qname = _qname(name)
        if qname is None:
            return DnsAnswer(records=(), nxdomain=True)
        found = self._from_cache(qname, rdtype)
        if found is not None:
            self._answers.put((name, rdtype), found, found.expires)
        return found

    def _from_cache(self, qname: dns.name.Name, rdtype: str) -> DnsAnswer | None:
        cache = self._resolver.cache
        if cache is None:
            return None
        answer = cache.get((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN))
        if answer is not None:
            records = tuple(answer.rrset) if answer.rrset is not None else ()
            return DnsAnswer(records=records, expires=answer.expiration)
        negative = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if negative is not None and negative.response.rcode() == dns.rcode.NXDOMAIN:
            return DnsAnswer(records=(), nxdomain=True, expires=negative.expiration)
        return None

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        """Answer for ``name``/``rdtype``; raise ``DnsTemporaryError`` on DNS trouble.

        A malformed name cannot exist in the DNS, so it is answered as NXDOMAIN
        (RFC 7208 §4.3 treats it the same way).
        """
        known = self.cached(name, rdtype)
        if known is not None:
            return known
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return DnsAnswer(records=(), nxdomain=True)
        # The Trio deadline bounds the whole lookup even when the resolver's own
        # wall-clock lifetime would let it retry, and it follows Trio's clock in tests.
        with trio.move_on_after(self._timeout):
            try:
                answer = await self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False
                )
            except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
                return DnsAnswer(records=(), nxdomain=True, expires=time.time())
            except (dns.exception.DNSException, OSError) as exc:
                raise DnsTemporaryError(f"{name}/{rdtype}: {exc}") from exc
            records = tuple(answer.rrset) if answer.rrset is not None else ()
            return DnsAnswer(records=records, expires=answer.expiration)
        raise DnsTemporaryError(f"{name}/{rdtype}: no answer within {self._timeout:g}s")


@functools.lru_cache(maxsize=CACHE_ENTRIES)
def _qname(name: str) -> dns.name.Name | None:
    """The absolute name (None if malformed), parsed once per distinct name."""
    try:
        return dns.name.from_text(name)
    except dns.exception.DNSException:
        return None


def txt_strings(answer: DnsAnswer) -> tuple[bytes, ...]:
    """Each TXT record's character-strings joined, as RFC 7208 §3.3 and RFC 6376 §3.6.2.2
    require."""
    return tuple(
        b"".join(record.strings) for record in answer.records if isinstance(record, TXTBase)
    )
