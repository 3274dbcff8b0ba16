"""SPF (RFC 7208) through pyspf, with its DNS answered by the Trio resolver.

pyspf evaluates the record, macros, processing limits (10 DNS-querying terms, 2 void
lookups, 10 MX/PTR names: §4.6.4) and results; it is synchronous, so it runs in a worker
thread. Its DNS hook, the module-level ``spf.DNSLookup`` (which pyspf's own test suite
replaces the same way), is pointed once at a dispatcher that sends each query back into
Trio with ``trio.from_thread.run``: lookups share the cached resolver, obey its timeout,
and are cancelled with the task that started the evaluation.

A sender seen within its records' TTLs is answered on the event loop, without a thread:
pyspf runs over cached answers only, and its result is kept (per client IP, MAIL FROM
and HELO) until the first of the answers it read expires, since until then the same
evaluation would give the same result.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from typing import Any

import spf
import trio

from ._resolver import DnsAnswer, DnsTemporaryError, Resolver, txt_strings
from ._results import Result, SpfOutcome
from ._ttlcache import TtlCache

#: RFC 7208 §4.6.4: an evaluation may be abandoned after at least 20 seconds; the
#: result is then temperror.
SPF_DEADLINE_SECONDS = 20.0

_Records = list[tuple[tuple[str, str], Any]]
_Lookup = Callable[[str, str], _Records]

_current_lookup: contextvars.ContextVar[_Lookup] = contextvars.ContextVar("spf_lookup")
_library_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: object = True, timeout: object = None) -> _Records:
    lookup = _current_lookup.get(None)
    if lookup is None:
        return _library_lookup(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    return lookup(name, qtype)


spf.DNSLookup = _dispatch


def _records(name: str, qtype: str, answer: DnsAnswer) -> _Records:
    """pyspf's record shapes, as its dnspython driver builds them."""
    key = (name, qtype)
    if qtype in ("TXT", "SPF"):
        return [(key, (text,)) for text in txt_strings(answer)]
    values: _Records = []
    for record in answer.records:
        if qtype in ("A", "AAAA"):
            values.append((key, record.address))  # type: ignore[attr-defined]
        elif qtype == "MX":
            exchange = record.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
            values.append((key, (record.preference, exchange)))  # type: ignore[attr-defined]
        elif qtype == "PTR":
            values.append((key, record.target.to_text(omit_final_dot=True)))  # type: ignore[attr-defined]
    return values


async def _lookup_async(resolver: Resolver, name: str, qtype: str) -> _Records:
    try:
        answer = await resolver.lookup(name, qtype)
    except DnsTemporaryError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    return _records(name, qtype, answer)


class _NotCached(Exception):
    """A query the cache cannot answer: the evaluation moves to a worker thread."""


def _query(client_ip: str, sender: str, helo: str) -> tuple[str, str]:
    try:
        query = spf.query(i=client_ip, s=sender, h=helo, strict=True)
        result, _code, explanation = query.check()
    except spf.PermError as exc:
        return "permerror", str(exc)
    except spf.TempError as exc:
        return "temperror", str(exc)
    return str(result), str(explanation)


#: (client IP, MAIL FROM, HELO) → (result, explanation): pyspf's answer, kept while every
#: DNS answer it read is (macros may use any of the three, so all are the key).
SpfResults = TtlCache[tuple[str, str, str], tuple[str, str]]


def _evaluate_cached(
    resolver: Resolver, client_ip: str, sender: str, helo: str
) -> tuple[tuple[str, str], float] | None:
    """On the event loop, when every answer is already cached (a sender seen within the
    TTLs): the same evaluation without a thread, and when its answers first expire.
    None when one query was not cached, even one pyspf swallowed (its ``exp=`` lookup)."""
    missed = False
    expires = math.inf

    def lookup(name: str, qtype: str) -> _Records:
        nonlocal missed, expires
        answer = resolver.cached(name, qtype)
        if answer is None:
            missed = True
            raise _NotCached(name)
        expires = min(expires, answer.expires)
        return _records(name, qtype, answer)

    token = _current_lookup.set(lookup)
    try:
        result = _query(client_ip, sender, helo)
    except _NotCached:
        return None
    finally:
        _current_lookup.reset(token)
    return None if missed else (result, expires)


def _evaluate(resolver: Resolver, client_ip: str, sender: str, helo: str) -> tuple[str, str]:
    """Runs in a worker thread; every DNS query re-enters Trio."""

    def lookup(name: str, qtype: str) -> _Records:
        return trio.from_thread.run(_lookup_async, resolver, name, qtype)

    _current_lookup.set(lookup)
    return _query(client_ip, sender, helo)


def _identity(helo: str, mail_from: str) -> tuple[str, str]:
    """RFC 7208 §2.4: MAIL FROM's domain, or HELO's for the null sender."""
    if mail_from:
        return "mailfrom", mail_from.rpartition("@")[2] or helo
    return "helo", helo


def _outcome(identity: str, domain: str, found: tuple[str, str]) -> SpfOutcome:
    result, reason = found
    try:
        value = Result(result)
    except ValueError:
        value = Result.PERMERROR
    return SpfOutcome(result=value, identity=identity, domain=domain.lower(), reason=reason)


def cached_spf(
    resolver: Resolver, results: SpfResults, *, client_ip: str, helo: str, mail_from: str
) -> SpfOutcome | None:
    """The result without I/O, on the event loop, when the DNS cache can give it: a
    result kept from an earlier message, or an evaluation over cached answers only."""
    identity, domain = _identity(helo, mail_from)
    if not domain:
        return SpfOutcome(result=Result.NONE, identity=identity, domain="", reason="no identity")
    key = (client_ip, mail_from, helo)
    found = results.get(key)
    if found is None:
        evaluated = _evaluate_cached(resolver, client_ip, mail_from, helo)
        if evaluated is None:
            return None
        found, expires = evaluated
        results.put(key, found, expires)
    return _outcome(identity, domain, found)


async def evaluate_spf(
    resolver: Resolver,
    limiter: trio.CapacityLimiter,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
) -> SpfOutcome:
    """RFC 7208 check_host() for MAIL FROM, or for HELO when the sender is null (§2.4),
    in a worker thread with its queries answered on Trio: for when ``cached_spf`` could
    not answer."""
    identity, domain = _identity(helo, mail_from)
    evaluate = functools.partial(_evaluate, resolver, client_ip, mail_from, helo)
    with trio.move_on_after(SPF_DEADLINE_SECONDS):
        found = await trio.to_thread.run_sync(evaluate, limiter=limiter)
        return _outcome(identity, domain, found)
    return SpfOutcome(
        result=Result.TEMPERROR,
        identity=identity,
        domain=domain.lower(),
        reason=f"evaluation exceeded {SPF_DEADLINE_SECONDS:g}s",
    )
