"""DKIM (RFC 6376) verification of every signature, through dkimpy and OpenSSL.

dkimpy parses the message and the signature fields (``verify_headerprep``, the first
step of its own ``dkim.asyncsupport`` split) and the key records; the key lookups run
on Trio, concurrently, through the cached resolver, which lets DNS trouble
(``temperror``) be told apart from a missing key (``permerror``), a distinction
dkimpy's blocking ``verify()`` loses. The hashes and the signature check are
``_dkim_crypto``'s (dkimpy's canonicalization, OpenSSL's RSA and Ed25519). A large
message is parsed and verified in a worker thread.

RFC 8301 is applied on top: rsa-sha1 signatures (§3.1) and RSA keys under 1024 bits
(§3.2) never pass; they get ``policy`` (RFC 8601 §2.7.1: signed, but not acceptable).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import attrs
import dkim
import trio

from ._dkim_crypto import ALGORITHMS, header_hash, public_key, signature_valid
from ._domains import normalise
from ._resolver import DnsTemporaryError, Resolver, txt_strings
from ._results import DkimOutcome, Result
from ._settings import NameServer

#: RFC 8301 §3.2: verifiers must not accept RSA keys shorter than this.
MIN_RSA_BITS = 1024
#: RFC 8301 §3.1: rsa-sha1 must not be considered valid.
_SHA1 = b"rsa-sha1"
#: Signatures verified per message; more are reported as ``policy`` unchecked, so a
#: message cannot make the server do unbounded DNS and crypto work.
MAX_SIGNATURES = 10

_quiet = logging.getLogger("relate_smtp.sender_auth.dkim")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@attrs.define
class _Signature:
    """One DKIM-Signature field between the parse and the crypto."""

    index: int
    outcome: DkimOutcome | None = None
    prep: Any = None
    key_name: str = ""
    key: bytes | None = None


@attrs.frozen
class ParsedMessage:
    """A message parsed once: the From field values and the signatures to verify."""

    verifier: Any
    from_values: tuple[str, ...]
    signatures: tuple[_Signature, ...]


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def split_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` (the header fields as ``[name, value]`` pairs, values
    CRLF-terminated; the body), without splitting the body into lines and joining them
    again, which was half the cost of parsing a typical message. With no bare LF
    anywhere the body is the bytes after the blank line as they are; otherwise, or for
    anything unusual, dkimpy's own parse runs. Raises ``dkim.MessageFormatError`` where
    it does."""
    if message.count(b"\n") != message.count(b"\r\n"):
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n") or end < 0:
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    headers: list[list[bytes]] = []
    for line in message[:end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not headers:
                return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
            headers[-1][1] += line + b"\r\n"
            continue
        match = _HEADER_NAME.match(line)
        if match is not None:
            headers.append([match.group(1), line[match.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, message[end + 4 :]


def parse_message(message: bytes) -> ParsedMessage:
    """Parse headers and signature fields (worker thread: the message may be large)."""
    try:
        verifier = dkim.DKIM(None, logger=_quiet, minkey=MIN_RSA_BITS)
        verifier.headers, verifier.body = split_message(message)
    except (dkim.DKIMException, IndexError):  # IndexError: dkimpy on a leading fold
        return ParsedMessage(None, (), ())
    from_values = tuple(
        value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
        for name, value in verifier.headers
        if name.lower() == b"from"
    )
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    signatures = []
    for index in range(count):
        signature = _Signature(index)
        signatures.append(signature)
        if index >= MAX_SIGNATURES:
            signature.outcome = DkimOutcome(result=Result.POLICY, reason="too many signatures")
            continue
        try:
            prep = verifier.verify_headerprep(index)
        except dkim.DKIMException as exc:
            signature.outcome = DkimOutcome(result=Result.PERMERROR, reason=str(exc))
            continue
        fields = prep[0]
        domain = normalise(_text(fields[b"d"]))
        algorithm = fields[b"a"]
        signature.outcome = DkimOutcome(
            result=Result.NONE,
            domain=domain or _text(fields[b"d"]),
            selector=_text(fields[b"s"]),
            algorithm=_text(algorithm),
        )
        if domain is None:
            signature.outcome = attrs.evolve(
                signature.outcome, result=Result.PERMERROR, reason="bad d= domain"
            )
        elif algorithm == _SHA1:
            signature.outcome = attrs.evolve(
                signature.outcome, result=Result.POLICY, reason="rsa-sha1 (RFC 8301)"
            )
        else:
            signature.prep = prep
            signature.key_name = f"{signature.outcome.selector}._domainkey.{domain}"
    return ParsedMessage(verifier, from_values, tuple(signatures))


async def fetch_key(resolver: Resolver, signature: _Signature) -> None:
    """RFC 6376 §3.6.2.2: one TXT record at ``<selector>._domainkey.<d>``."""
    assert signature.outcome is not None
    try:
        answer = await resolver.lookup(signature.key_name, "TXT")
    except DnsTemporaryError as exc:
        signature.outcome = attrs.evolve(
            signature.outcome, result=Result.TEMPERROR, reason=str(exc)
        )
        return
    keys = txt_strings(answer)
    if len(keys) != 1:
        reason = "no key record" if not keys else "several key records"
        signature.outcome = attrs.evolve(signature.outcome, result=Result.PERMERROR, reason=reason)
        return
    signature.key = keys[0]


def verify_signatures(parsed: ParsedMessage) -> tuple[DkimOutcome, ...]:
    """The crypto for every signature whose key was found (worker thread)."""
    verifier = parsed.verifier
    outcomes = []
    for signature in parsed.signatures:
        assert signature.outcome is not None
        if signature.key is not None:
            signature.outcome = _verify_one(verifier, signature, signature.outcome)
        outcomes.append(signature.outcome)
    return tuple(outcomes)


def _verify_one(verifier: Any, signature: _Signature, outcome: DkimOutcome) -> DkimOutcome:
    fields, include_headers, headers = signature.prep
    assert signature.key is not None
    try:
        key = public_key(signature.key_name, signature.key)
    except (dkim.DKIMException, ValueError) as exc:
        return attrs.evolve(outcome, result=Result.PERMERROR, reason=f"key: {exc}")
    if key.kind != ALGORITHMS.get(fields[b"a"]):
        return attrs.evolve(outcome, result=Result.PERMERROR, reason="key type mismatch")
    if key.kind == b"rsa" and key.bits < MIN_RSA_BITS:
        return attrs.evolve(outcome, result=Result.POLICY, reason=f"{key.bits}-bit key (RFC 8301)")
    if key.tlsrpt:
        reason = "key is for TLS reports only (s=tlsrpt)"
        return attrs.evolve(outcome, result=Result.FAIL, reason=reason)
    try:
        digest = header_hash(verifier, fields, include_headers, headers[signature.index])
        valid = signature_valid(key, fields, digest)
    except dkim.DKIMException as exc:
        return attrs.evolve(outcome, result=Result.FAIL, reason=str(exc))
    if not valid:
        return attrs.evolve(outcome, result=Result.FAIL, reason="signature did not verify")
    return attrs.evolve(outcome, result=Result.PASS, reason="")


def verify_standalone(
    message: bytes, dns_servers: tuple[NameServer, ...], dns_timeout: float
) -> tuple[tuple[DkimOutcome, ...], tuple[str, ...]]:
    """Every signature of ``message`` and its From values, in a process of its own.

    For a large message, run in a worker process: parsing and canonicalization then
    cost that process's memory and CPU, not the server's. It looks its keys up with a
    resolver of its own (no shared cache: large messages are few). A message too big
    for the process's memory limit gets ``temperror`` for its signatures.
    """
    try:
        parsed = parse_message(message)
    except MemoryError:
        return (DkimOutcome(result=Result.TEMPERROR, reason="message too large to verify"),), ()

    async def verify() -> tuple[DkimOutcome, ...]:
        resolver = Resolver.create(dns_servers, timeout=dns_timeout)
        return await check_dkim(resolver, trio.CapacityLimiter(1), parsed, inline=True)

    try:
        return trio.run(verify), parsed.from_values
    except MemoryError:
        return (DkimOutcome(result=Result.TEMPERROR, reason="message too large to verify"),), ()


async def check_dkim(
    resolver: Resolver,
    limiter: trio.CapacityLimiter,
    parsed: ParsedMessage,
    *,
    inline: bool = False,
) -> tuple[DkimOutcome, ...]:
    """Verify every signature of an already parsed message (``inline``: on the event
    loop, for a small message; else in a worker thread)."""
    wanted = [signature for signature in parsed.signatures if signature.key_name]
    if len(wanted) == 1:
        await fetch_key(resolver, wanted[0])  # the common case, without a nursery
    elif wanted:
        async with trio.open_nursery() as nursery:
            for signature in wanted:
                nursery.start_soon(fetch_key, resolver, signature)
    if inline:
        return verify_signatures(parsed)
    return await trio.to_thread.run_sync(verify_signatures, parsed, limiter=limiter)
