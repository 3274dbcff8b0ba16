"""The per-message shortcuts give the answers the full computation gives.

DKIM is checked by OpenSSL over dkimpy's canonicalization (compared with dkimpy's own
``verify``), SPF results are kept only while their DNS answers are, DMARC ``pct`` is
drawn for each message although the evaluation is reused, and results known at once
skip the background task.
"""

from __future__ import annotations

import base64

import dkim
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from relate_smtp.sender_auth import Result
from relate_smtp.sender_auth._dkim import parse_message, split_message, verify_signatures
from relate_smtp.sender_auth._dkim_crypto import without_signature
from relate_smtp.sender_auth._pending import Pending
from relate_smtp.sender_auth._ttlcache import TtlCache

from .conftest import BAD_IP, GOOD_IP, Factory, Key, message, publish, sign, transaction
from .dns_server import DnsServer

BANK = "bank.example"


def _ours(raw: bytes, record: str) -> list[Result]:
    parsed = parse_message(raw)
    for signature in parsed.signatures:
        if signature.key_name:
            signature.key = record.encode()
    return [outcome.result for outcome in verify_signatures(parsed)]


def _dkimpy(raw: bytes, record: str) -> bool:
    return bool(dkim.verify(raw, dnsfunc=lambda _name, timeout=5: record.encode()))


def _sign(raw: bytes, key: Key, **options: object) -> bytes:
    header = dkim.sign(raw, b"s1", BANK.encode(), key.private, **options)
    return bytes(header) + raw


@pytest.mark.parametrize("key_name", ["rsa_2048", "ed25519"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"canonicalize": (b"relaxed", b"relaxed")},
        {"canonicalize": (b"simple", b"simple")},
        {"length": True},
        {"include_headers": [b"from", b"from", b"subject", b"x-absent"]},
    ],
)
@pytest.mark.parametrize("tamper", ["none", "body", "header", "added from", "trailing space"])
def test_dkim_agrees_with_dkimpy(
    key_name: str, options: dict[str, object], tamper: str, request: pytest.FixtureRequest
) -> None:
    key: Key = request.getfixturevalue(key_name)
    raw = message(f"Bank <security@{BANK}>", body="Hello  there.\r\n\r\nBye.\r\n\r\n")
    options = {"signature_algorithm": key.algorithm, **options}
    signed = _sign(raw, key, **options)
    if tamper == "body":
        signed = signed.replace(b"Bye.", b"Bye!")
    elif tamper == "header":
        signed = signed.replace(b"Subject: Test", b"Subject: Tost")
    elif tamper == "added from":
        head, _, body = signed.partition(b"\r\n\r\n")
        signed = head + b"\r\nFrom: other@evil.example\r\n\r\n" + body
    elif tamper == "trailing space":
        signed = signed.replace(b"Bye.\r\n", b"Bye. \r\n")

    expected = _dkimpy(signed, key.record)

    assert _ours(signed, key.record) == [Result.PASS if expected else Result.FAIL]


def test_dkim_key_for_tls_reports_only_never_passes(rsa_2048: Key) -> None:
    signed = _sign(message(f"security@{BANK}"), rsa_2048)

    assert _ours(signed, rsa_2048.record + "; s=tlsrpt") == [Result.FAIL]


def test_dkim_bad_signature_encoding_fails(rsa_2048: Key) -> None:
    signed = _sign(message(f"security@{BANK}"), rsa_2048)
    head, _, rest = signed.partition(b" b=")
    forged = head + b" b=" + base64.b64encode(b"\x00" * 256) + b";" + rest.partition(b"\r\n")[2]

    assert _ours(forged, rsa_2048.record) in ([Result.FAIL], [Result.PERMERROR])


_FIELD_TEXT = st.text(alphabet=" \t\r\n;b=hAz+/0", max_size=60).map(str.encode)


_MESSAGE_PIECES = st.sampled_from(
    [
        b"From: a@b.example",
        b"Subject: x",
        b"DKIM-Signature: v=1; b=abc",
        b"X-y:z",
        b" folded",
        b"\tfolded",
        b"From mbox line",
        b"bad header line",
        b"",
        b"body text",
        b".",
        b" ",
    ]
)
_LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@given(st.lists(st.tuples(_MESSAGE_PIECES, _LINE_ENDS), max_size=12), st.booleans())
def test_message_split_is_dkimpys(lines: list[tuple[bytes, bytes]], trailing: bool) -> None:
    message = b"".join(text + end for text, end in lines) + (b"tail" if trailing else b"")

    def outcome(parse: object) -> object:
        try:
            return parse(message)  # type: ignore[operator]
        except (dkim.MessageFormatError, IndexError) as exc:
            return type(exc)

    assert outcome(split_message) == outcome(dkim.rfc822_parse)


@given(prefix=_FIELD_TEXT, value=_FIELD_TEXT, suffix=_FIELD_TEXT)
def test_signature_removal_is_dkimpys(prefix: bytes, value: bytes, suffix: bytes) -> None:
    field = b" v=1;" + prefix + b" b=" + value + suffix

    assert without_signature(field) == dkim.RE_BTAG.sub(b"\\1", field)


def test_signature_removal_on_real_fields(rsa_2048: Key, ed25519: Key) -> None:
    raw = message(f"security@{BANK}")
    for key in (rsa_2048, ed25519):
        for options in ({}, {"canonicalize": (b"relaxed", b"relaxed")}, {"length": True}):
            field = _sign(raw, key, signature_algorithm=key.algorithm, **options)
            value = field.partition(b":")[2].partition(b"\r\nFrom:")[0] + b"\r\n"
            assert without_signature(value) == dkim.RE_BTAG.sub(b"\\1", value)
            assert b" b=" in without_signature(value)


async def test_spf_result_is_reused_while_the_record_is_cached(
    dns_server: DnsServer, authenticator: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relate_smtp.sender_auth import _spf

    evaluations = 0
    original = _spf._query

    def counting(*args: str) -> tuple[str, str]:
        nonlocal evaluations
        evaluations += 1
        return original(*args)

    monkeypatch.setattr(_spf, "_query", counting)
    dns_server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all", ttl=300)
    auth = authenticator()
    raw = message(f"security@{BANK}")

    first = await transaction(auth, raw, mail_from=f"x@{BANK}")
    await transaction(auth, raw, mail_from=f"x@{BANK}")  # evaluated over cached answers
    counted = evaluations
    again = await transaction(auth, raw, mail_from=f"x@{BANK}")
    reused = evaluations == counted
    other = await transaction(auth, raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert reused
    assert first.spf == again.spf
    assert first.spf is not None and first.spf.result is Result.PASS
    assert other.spf is not None and other.spf.result is Result.FAIL


async def test_spf_result_is_not_kept_past_its_records_ttl(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all", ttl=0)
    auth = authenticator()
    raw = message(f"security@{BANK}")
    first = await transaction(auth, raw, mail_from=f"x@{BANK}")
    dns_server.txt(BANK, "v=spf1 -all", ttl=0)

    again = await transaction(auth, raw, mail_from=f"x@{BANK}")

    assert first.spf is not None and first.spf.result is Result.PASS
    assert again.spf is not None and again.spf.result is Result.FAIL


async def test_pct_is_drawn_for_each_message(dns_server: DnsServer, authenticator: Factory) -> None:
    dns_server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all")
    dns_server.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject; pct=50")
    draws = iter([0.1, 0.9, 0.2])
    auth = authenticator(random=lambda: next(draws))
    raw = message(f"security@{BANK}")

    refused = [
        (await transaction(auth, raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)).refuse
        for _ in range(3)
    ]

    assert refused == [True, False, True]


async def test_dkim_pass_of_a_known_sender_is_still_checked_per_message(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    """Cached keys and results never make a tampered message pass."""
    dns_server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all")
    dns_server.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject")
    publish(dns_server, rsa_2048, domain=BANK)
    auth = authenticator()
    signed = sign(message(f"security@{BANK}"), rsa_2048, domain=BANK)

    good = await transaction(auth, signed, mail_from=f"x@{BANK}", client_ip=BAD_IP)
    bad = await transaction(
        auth, signed.replace(b"Hello.", b"Hello!"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert good.dkim[0].result is Result.PASS and not good.refuse
    assert bad.dkim[0].result is Result.FAIL and bad.refuse


async def test_resolved_pending_needs_no_task() -> None:
    pending = Pending.resolved(42)
    pending.cancel()

    assert await pending.result() == 42


def test_ttl_cache_drops_expired_and_least_recent(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1000.0
    monkeypatch.setattr("relate_smtp.sender_auth._ttlcache.time.time", lambda: now)
    cache: TtlCache[str, int] = TtlCache(2)
    cache.put("a", 1, expires=1010)
    cache.put("b", 2, expires=1005)
    cache.put("stale", 0, expires=999)
    assert cache.get("a") == 1
    cache.put("c", 3, expires=1010)  # "b" is the least recently used

    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.get("stale")) == (
        1,
        None,
        3,
        None,
    )
    now = 1010.0
    assert cache.get("a") is None


async def test_no_background_task_when_everything_is_cached(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all")
    dns_server.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject")
    auth = authenticator()
    raw = message(f"security@{BANK}")
    await transaction(auth, raw, mail_from=f"x@{BANK}")

    async with trio.open_nursery() as nursery:
        check = auth.begin(nursery, client_ip=GOOD_IP, helo="mail.example", mail_from=f"x@{BANK}")
        check.from_header_seen(f"security@{BANK}")
        assert nursery.child_tasks == frozenset()
        verdict = await check.verdict(raw)

    assert verdict.by_mechanism() == {"spf": "pass", "dkim": "none", "dmarc": "pass"}
