"""SPF (RFC 7208) through pyspf, with its DNS answered by the Trio resolver.

pyspf evaluates the record, macros, processing limits (10 DNS-querying terms, 2 void
lookups, 10 MX/PTR names: §4.6.4) and results; it is synchronous, so it runs in a worker
thread. Its DNS hook, the module-level ``spf.DNSLookup`` (which pyspf's own test suite
replaces the same way), is pointed once at a dispatcher that sends each query back into
Trio with ``trio.from_thread.run``: lookups share the cached resolver, obey its timeout,
and are cancelled with the task that started the evaluation.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import spf
import trio

from ._resolver import DnsAnswer, DnsTemporaryError, Resolver, txt_strings
from ._results import Result, SpfOutcome

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


def _evaluate(resolver: Resolver, client_ip: str, sender: str, helo: str) -> tuple[str, str]:
    """Runs in a worker thread; every DNS query re-enters Trio."""

    def lookup(name: str, qtype: str) -> _Records:
        return trio.from_thread.run(_lookup_async, resolver, name, qtype)

    _current_lookup.set(lookup)
    try:
        query = spf.query(i=client_ip, s=sender, h=helo, strict=True)
        result, _code, explanation = query.check()
    except spf.PermError as exc:
        return "permerror", str(exc)
    except spf.TempError as exc:
        return "temperror", str(exc)
    return str(result), str(explanation)


async def check_spf(
    resolver: Resolver,
    limiter: trio.CapacityLimiter,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
) -> SpfOutcome:
    """RFC 7208 check_host() for MAIL FROM, or for HELO when the sender is null (§2.4)."""
    if mail_from:
        identity, domain = "mailfrom", mail_from.rpartition("@")[2] or helo
    else:
        identity, domain = "helo", helo
    if not domain:
        return SpfOutcome(result=Result.NONE, identity=identity, domain="", reason="no identity")
    evaluate = functools.partial(_evaluate, resolver, client_ip, mail_from, helo)
    with trio.move_on_after(SPF_DEADLINE_SECONDS):
        result, reason = await trio.to_thread.run_sync(evaluate, limiter=limiter)
        try:
            value = Result(result)
        except ValueError:
            value = Result.PERMERROR
        return SpfOutcome(result=value, identity=identity, domain=domain.lower(), reason=reason)
    return SpfOutcome(
        result=Result.TEMPERROR,
        identity=identity,
        domain=domain.lower(),
        reason=f"evaluation exceeded {SPF_DEADLINE_SECONDS:g}s",
    )
