"""End-to-end library checks against the loopback DNS server (issue 15's "done when")."""

from __future__ import annotations

import authres
import authres.dmarc
import pytest

from relate_smtp.sender_auth import Disposition, Mode, Result

from .conftest import (
    BAD_IP,
    GOOD_IP,
    Factory,
    Key,
    message,
    publish,
    sign,
    transaction,
)
from .dns_server import DnsServer

BANK = "bank.example"


def bank_zone(server: DnsServer, dmarc: str = "v=DMARC1; p=reject") -> None:
    server.txt(BANK, f"v=spf1 ip4:{GOOD_IP} -all")
    server.txt(f"_dmarc.{BANK}", dmarc)


def parse(header: str) -> dict[str, str]:
    parsed = authres.all_features().parse(header)
    return {result.method: result.result for result in parsed.results}


@pytest.mark.parametrize("key_name", ["rsa_2048", "ed25519"])
async def test_aligned_dkim_signature_passes(
    dns_server: DnsServer, authenticator: Factory, key_name: str, request: pytest.FixtureRequest
) -> None:
    key: Key = request.getfixturevalue(key_name)
    bank_zone(dns_server)
    publish(dns_server, key, domain=BANK)
    raw = sign(message(f"Bank <security@{BANK}>"), key, domain=BANK)

    verdict = await transaction(authenticator(), raw, mail_from=f"bounce@{BANK}")

    assert not verdict.refuse
    assert verdict.by_mechanism() == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert verdict.dkim[0].algorithm == key.algorithm.decode()
    assert parse(verdict.authentication_results) == {
        "spf": "pass",
        "dkim": "pass",
        "dmarc": "pass",
    }


async def test_forged_from_of_reject_domain_is_refused_in_enforce(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    bank_zone(dns_server)
    raw = message(f"Security <security@{BANK}>")

    verdict = await transaction(
        authenticator(Mode.ENFORCE), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert verdict.refuse
    assert BANK in verdict.reason
    assert verdict.by_mechanism() == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert verdict.dmarc[0].disposition is Disposition.REJECT
    assert "policy.dmarc=reject" in verdict.authentication_results


async def test_forged_from_is_accepted_and_reported_in_observe(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    bank_zone(dns_server)
    raw = message(f"security@{BANK}")

    verdict = await transaction(
        authenticator(Mode.OBSERVE), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.reason == ""
    assert parse(verdict.authentication_results) == {
        "spf": "fail",
        "dkim": "none",
        "dmarc": "fail",
    }


async def test_forged_from_with_other_envelope_domain_is_refused(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    """SPF passes for the spammer's own domain, which is not aligned with From."""
    bank_zone(dns_server)
    dns_server.txt("spammer.example", f"v=spf1 ip4:{BAD_IP} -all")

    verdict = await transaction(
        authenticator(),
        message(f"security@{BANK}"),
        mail_from="a@spammer.example",
        client_ip=BAD_IP,
    )

    assert verdict.spf is not None and verdict.spf.result is Result.PASS
    assert verdict.refuse


async def test_spf_fail_with_aligned_dkim_pass_is_dmarc_pass(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, rsa_2048, domain=BANK)
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=BANK)

    verdict = await transaction(authenticator(), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert verdict.by_mechanism() == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    assert not verdict.refuse


async def test_relaxed_dkim_alignment_accepts_a_subdomain_signer(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, rsa_2048, domain=f"mail.{BANK}")
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=f"mail.{BANK}")

    verdict = await transaction(authenticator(), raw, mail_from="x@other.example", client_ip=BAD_IP)

    assert verdict.by_mechanism()["dmarc"] == "pass"


async def test_strict_dkim_alignment_refuses_a_subdomain_signer(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=reject; adkim=s")
    publish(dns_server, rsa_2048, domain=f"mail.{BANK}")
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=f"mail.{BANK}")

    verdict = await transaction(authenticator(), raw, mail_from="x@other.example", client_ip=BAD_IP)

    assert verdict.dkim[0].result is Result.PASS
    assert verdict.by_mechanism()["dmarc"] == "fail"
    assert verdict.refuse


async def test_strict_spf_alignment_needs_the_exact_domain(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=reject; aspf=s")
    dns_server.txt(f"bounces.{BANK}", f"v=spf1 ip4:{GOOD_IP} -all")

    verdict = await transaction(
        authenticator(), message(f"security@{BANK}"), mail_from=f"b@bounces.{BANK}"
    )

    assert verdict.spf is not None and verdict.spf.result is Result.PASS
    assert verdict.refuse


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
async def test_pct_zero_is_never_refused(
    dns_server: DnsServer, authenticator: Factory, draw: float
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=reject; pct=0")

    verdict = await transaction(
        authenticator(random=lambda: draw),
        message(f"security@{BANK}"),
        mail_from=f"x@{BANK}",
        client_ip=BAD_IP,
    )

    assert not verdict.refuse
    assert verdict.dmarc[0].result is Result.FAIL
    assert verdict.dmarc[0].sampled_out
    assert verdict.dmarc[0].disposition is Disposition.QUARANTINE


@pytest.mark.parametrize(
    ("draw", "refused"), [(0.0, True), (0.49, True), (0.5, False), (0.9, False)]
)
async def test_pct_samples_with_the_injected_random_source(
    dns_server: DnsServer, authenticator: Factory, draw: float, refused: bool
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=reject; pct=50")

    verdict = await transaction(
        authenticator(random=lambda: draw),
        message(f"security@{BANK}"),
        mail_from=f"x@{BANK}",
        client_ip=BAD_IP,
    )

    assert verdict.refuse is refused


async def test_quarantine_policy_is_accepted(dns_server: DnsServer, authenticator: Factory) -> None:
    bank_zone(dns_server, "v=DMARC1; p=quarantine")

    verdict = await transaction(
        authenticator(), message(f"security@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.dmarc[0].result is Result.FAIL
    assert verdict.dmarc[0].disposition is Disposition.QUARANTINE


async def test_body_changed_after_signing_fails_dkim(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, rsa_2048, domain=BANK)
    signed = sign(message(f"security@{BANK}", body="Pay 10 EUR.\r\n"), rsa_2048, domain=BANK)
    tampered = signed.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")

    verdict = await transaction(authenticator(), tampered, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert verdict.dkim[0].result is Result.FAIL
    assert "body hash" in verdict.dkim[0].reason
    assert verdict.refuse


async def test_header_changed_after_signing_fails_dkim(
    dns_server: DnsServer, authenticator: Factory, ed25519: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, ed25519, domain=BANK)
    signed = sign(message(f"security@{BANK}", subject="Hello"), ed25519, domain=BANK)

    verdict = await transaction(
        authenticator(),
        signed.replace(b"Subject: Hello", b"Subject: Urgent"),
        mail_from=f"x@{BANK}",
        client_ip=BAD_IP,
    )

    assert verdict.dkim[0].result is Result.FAIL


async def test_rsa_sha1_never_passes(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, rsa_2048, domain=BANK)
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=BANK, algorithm=b"rsa-sha1")

    verdict = await transaction(authenticator(), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert verdict.dkim[0].result is Result.POLICY
    assert verdict.dkim[0].algorithm == "rsa-sha1"
    assert verdict.refuse


async def test_512_bit_key_never_passes(
    dns_server: DnsServer, authenticator: Factory, rsa_512: Key
) -> None:
    bank_zone(dns_server)
    publish(dns_server, rsa_512, domain=BANK)
    raw = sign(message(f"security@{BANK}"), rsa_512, domain=BANK)

    verdict = await transaction(authenticator(), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert verdict.dkim[0].result is Result.POLICY
    assert "512" in verdict.dkim[0].reason
    assert verdict.refuse


async def test_every_signature_is_verified(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key, ed25519: Key
) -> None:
    """A broken third-party signature does not hide a good aligned one (RFC 6376 §6.1)."""
    bank_zone(dns_server)
    publish(dns_server, rsa_2048, domain=BANK)
    dns_server.txt("list.example", "v=spf1 -all")
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=BANK)
    raw = sign(raw, ed25519, domain="list.example")  # key not published

    verdict = await transaction(authenticator(), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP)

    assert [(o.domain, o.result) for o in verdict.dkim] == [
        ("list.example", Result.PERMERROR),
        (BANK, Result.PASS),
    ]
    assert not verdict.refuse


async def test_servfail_never_refuses(dns_server: DnsServer, authenticator: Factory) -> None:
    bank_zone(dns_server)
    dns_server.servfail(BANK)
    dns_server.servfail(f"_dmarc.{BANK}")

    verdict = await transaction(
        authenticator(), message(f"security@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.by_mechanism() == {"spf": "temperror", "dkim": "none", "dmarc": "temperror"}


async def test_dns_timeouts_never_refuse(
    dns_server: DnsServer, authenticator: Factory, rsa_2048: Key, autojump_clock: object
) -> None:
    bank_zone(dns_server)
    dns_server.silent(BANK)
    dns_server.silent(f"_dmarc.{BANK}")
    dns_server.silent(f"s1._domainkey.{BANK}")
    raw = sign(message(f"security@{BANK}"), rsa_2048, domain=BANK)

    verdict = await transaction(
        authenticator(timeout=5), raw, mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.by_mechanism() == {"spf": "temperror", "dkim": "temperror", "dmarc": "temperror"}


async def test_bad_dmarc_record_never_refuses(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=bogus")

    verdict = await transaction(
        authenticator(), message(f"security@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.dmarc[0].result is Result.PERMERROR


async def test_two_dmarc_records_mean_no_dmarc(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject", "v=DMARC1; p=none")

    verdict = await transaction(
        authenticator(), message(f"security@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert verdict.dmarc[0].result is Result.PERMERROR


@pytest.mark.parametrize(
    ("record", "refused"),
    [("v=DMARC1; p=none; sp=reject", True), ("v=DMARC1; p=reject; sp=none", False)],
)
async def test_subdomain_policy_applies_to_subdomains(
    dns_server: DnsServer, authenticator: Factory, record: str, refused: bool
) -> None:
    bank_zone(dns_server, record)

    verdict = await transaction(
        authenticator(), message(f"news@alerts.{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert verdict.refuse is refused
    assert verdict.dmarc[0].record_domain == BANK
    assert dns_server.count(f"_dmarc.alerts.{BANK}", "TXT") == 1


async def test_subdomain_policy_does_not_apply_to_the_domain_itself(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    bank_zone(dns_server, "v=DMARC1; p=none; sp=reject")

    verdict = await transaction(
        authenticator(), message(f"x@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse


async def test_organizational_domain_comes_from_the_public_suffix_list(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")

    verdict = await transaction(
        authenticator(),
        message("x@a.b.example.co.uk"),
        mail_from="x@a.b.example.co.uk",
        client_ip=BAD_IP,
    )

    assert verdict.refuse
    assert verdict.dmarc[0].record_domain == "example.co.uk"
    asked = [name for name, rdtype in dns_server.queries if name.startswith("_dmarc.")]
    assert asked == ["_dmarc.a.b.example.co.uk", "_dmarc.example.co.uk"]


async def test_public_suffix_identifier_is_never_aligned(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    """An SPF pass for ``co.uk`` itself does not align with ``example.co.uk``."""
    dns_server.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")
    dns_server.txt("co.uk", f"v=spf1 ip4:{BAD_IP} -all")

    verdict = await transaction(
        authenticator(), message("x@example.co.uk"), mail_from="x@co.uk", client_ip=BAD_IP
    )

    assert verdict.spf is not None and verdict.spf.result is Result.PASS
    assert verdict.refuse


async def test_strictest_author_domain_wins(dns_server: DnsServer, authenticator: Factory) -> None:
    """RFC 7489 §6.6.1: every author domain is checked and the strictest failure applies."""
    bank_zone(dns_server)
    dns_server.txt("_dmarc.friend.example", "v=DMARC1; p=none")

    verdict = await transaction(
        authenticator(),
        message(f"a@friend.example, b@{BANK}"),
        mail_from="a@friend.example",
        client_ip=BAD_IP,
    )

    assert [o.domain for o in verdict.dmarc] == ["friend.example", BANK]
    assert verdict.refuse


async def test_spf_lookup_limit_is_permerror_and_never_refuses(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    includes = " ".join(f"include:i{n}.sender.example" for n in range(11))
    dns_server.txt("sender.example", f"v=spf1 {includes} -all")
    for n in range(11):
        dns_server.txt(f"i{n}.sender.example", "v=spf1 ip4:198.51.100.1 -all")

    verdict = await transaction(
        authenticator(reject_spf_fail=True),
        message("x@sender.example"),
        mail_from="x@sender.example",
        client_ip=BAD_IP,
    )

    assert verdict.spf is not None and verdict.spf.result is Result.PERMERROR
    assert "lookups" in verdict.spf.reason
    assert not verdict.refuse


async def test_spf_void_lookup_limit_is_permerror(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt(
        "sender.example", "v=spf1 a:v1.sender.example a:v2.sender.example a:v3.sender.example -all"
    )

    verdict = await transaction(
        authenticator(reject_spf_fail=True),
        message("x@sender.example"),
        mail_from="x@sender.example",
        client_ip=BAD_IP,
    )

    assert verdict.spf is not None and verdict.spf.result is Result.PERMERROR
    assert "Void lookup" in verdict.spf.reason
    assert not verdict.refuse


async def test_null_sender_checks_the_helo_identity(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("mail.sender.example", f"v=spf1 ip4:{GOOD_IP} -all")

    verdict = await transaction(
        authenticator(), message("x@sender.example"), mail_from="", helo="mail.sender.example"
    )

    assert verdict.spf is not None
    assert (verdict.spf.identity, verdict.spf.result) == ("helo", Result.PASS)
    assert "smtp.helo=mail.sender.example" in verdict.authentication_results


@pytest.mark.parametrize(
    ("reject_spf_fail", "dmarc", "refused"),
    [
        (True, None, True),
        (True, "v=DMARC1; p=none", False),
        (False, None, False),
    ],
)
async def test_reject_spf_fail_only_without_dmarc_record(
    dns_server: DnsServer,
    authenticator: Factory,
    reject_spf_fail: bool,
    dmarc: str | None,
    refused: bool,
) -> None:
    dns_server.txt("sender.example", f"v=spf1 ip4:{GOOD_IP} -all")
    if dmarc is not None:
        dns_server.txt("_dmarc.sender.example", dmarc)

    verdict = await transaction(
        authenticator(reject_spf_fail=reject_spf_fail),
        message("x@sender.example"),
        mail_from="x@sender.example",
        client_ip=BAD_IP,
    )

    assert verdict.spf is not None and verdict.spf.result is Result.FAIL
    assert verdict.refuse is refused
    if refused:
        assert "SPF" in verdict.reason


async def test_reject_spf_fail_is_ignored_in_observe(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("sender.example", f"v=spf1 ip4:{GOOD_IP} -all")

    verdict = await transaction(
        authenticator(Mode.OBSERVE, reject_spf_fail=True),
        message("x@sender.example"),
        mail_from="x@sender.example",
        client_ip=BAD_IP,
    )

    assert not verdict.refuse


async def test_softfail_is_never_refused(dns_server: DnsServer, authenticator: Factory) -> None:
    dns_server.txt("sender.example", f"v=spf1 ip4:{GOOD_IP} ~all")

    verdict = await transaction(
        authenticator(reject_spf_fail=True),
        message("x@sender.example"),
        mail_from="x@sender.example",
        client_ip=BAD_IP,
    )

    assert verdict.spf is not None and verdict.spf.result is Result.SOFTFAIL
    assert not verdict.refuse


async def test_off_mode_sends_no_query(dns_server: DnsServer, authenticator: Factory) -> None:
    bank_zone(dns_server)

    verdict = await transaction(
        authenticator(Mode.OFF), message(f"x@{BANK}"), mail_from=f"x@{BANK}", client_ip=BAD_IP
    )

    assert not verdict.refuse
    assert dns_server.queries == []
    assert verdict.authentication_results == "Authentication-Results: mx.relate.test; none"
