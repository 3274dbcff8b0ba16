"""Domain names as DMARC compares them, and organizational domains from the PSL.

RFC 7489 §3.2 defines the organizational domain through a public suffix list. The list
is the copy packaged inside ``publicsuffixlist`` (updated with each release of that
package), loaded once and never fetched at run time. Its private section is used as
well as the ICANN one, as OpenDMARC does, so ``a.github.io`` and ``b.github.io`` are
different organizations.
"""

from __future__ import annotations

import email.utils
import functools

import dns.exception
import dns.name
from publicsuffixlist import PublicSuffixList

#: Distinct names remembered by the pure functions below: mail comes from a few senders
#: again and again, and each parse or PSL walk costs tens of microseconds.
NAMES_CACHED = 4096


@functools.lru_cache(maxsize=NAMES_CACHED)
def normalise(domain: str) -> str | None:
    """Lower-case A-label form without the final dot, or None if not a DNS name."""
    domain = domain.strip().rstrip(".")
    if not domain or domain.startswith("["):
        return None
    try:
        name = dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError):
        return None
    text = name.to_text(omit_final_dot=True).lower()
    return text or None


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@functools.lru_cache(maxsize=NAMES_CACHED)
def organizational_domain(domain: str) -> str | None:
    """RFC 7489 §3.2: the public suffix plus one label; None if ``domain`` is a suffix."""
    return _psl().privatesuffix(domain)


def author_domains(from_values: list[str]) -> tuple[str, ...]:
    """RFC 7489 §6.6.1: the distinct domains of the RFC5322.From addresses, in order."""
    seen: dict[str, None] = {}
    for value in from_values:
        seen.update(dict.fromkeys(_domains_of(value)))
    return tuple(seen)


@functools.lru_cache(maxsize=NAMES_CACHED)
def _domains_of(value: str) -> tuple[str, ...]:
    """The domains of one From field value (both calls per message share the parse)."""
    seen: dict[str, None] = {}
    for _, address in email.utils.getaddresses([value]):
        local, at, domain = address.rpartition("@")
        if not at or not local:
            continue
        normalised = normalise(domain)
        if normalised is not None:
            seen.setdefault(normalised)
    return tuple(seen)
