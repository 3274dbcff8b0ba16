"""The Check's timeline: work starts early, overlaps the body, and cancels cleanly."""

from __future__ import annotations

import trio
import trio.testing

from relate_smtp.sender_auth import Mode, Result

from .conftest import BAD_IP, GOOD_IP, Factory, message
from .dns_server import DnsServer


async def test_spf_starts_at_begin_before_the_body(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("sender.example", f"v=spf1 ip4:{GOOD_IP} -all")
    auth = authenticator()
    async with trio.open_nursery() as nursery:
        check = auth.begin(
            nursery, client_ip=GOOD_IP, helo="h.example", mail_from="a@sender.example"
        )
        with trio.fail_after(5):
            await dns_server.wait_for_query("sender.example", "TXT")
        verdict = await check.verdict(message("a@sender.example"))

    assert verdict.spf is not None and verdict.spf.result is Result.PASS


async def test_dmarc_discovery_starts_when_from_is_seen(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("_dmarc.sender.example", "v=DMARC1; p=reject")
    auth = authenticator()
    async with trio.open_nursery() as nursery:
        check = auth.begin(
            nursery, client_ip=BAD_IP, helo="h.example", mail_from="a@sender.example"
        )
        check.from_header_seen('"Sender" <a@Sender.Example>')
        with trio.fail_after(5):
            await dns_server.wait_for_query("_dmarc.sender.example", "TXT")
        verdict = await check.verdict(message("a@sender.example"))

    assert verdict.refuse
    assert dns_server.count("_dmarc.sender.example", "TXT") == 1


async def test_verdict_uses_the_from_of_the_message(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    """A From value announced early but absent from the message does not count."""
    dns_server.txt("_dmarc.bank.example", "v=DMARC1; p=reject")
    auth = authenticator()
    async with trio.open_nursery() as nursery:
        check = auth.begin(nursery, client_ip=BAD_IP, helo="h.example", mail_from="a@other.example")
        check.from_header_seen("a@nice.example")
        verdict = await check.verdict(message("a@bank.example"))

    assert [o.domain for o in verdict.dmarc] == ["bank.example"]
    assert verdict.refuse


async def test_cancel_ends_hanging_lookups_at_once(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.silent("sender.example")
    dns_server.silent("_dmarc.sender.example")
    auth = authenticator(timeout=60)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            check = auth.begin(
                nursery, client_ip=BAD_IP, helo="h.example", mail_from="a@sender.example"
            )
            check.from_header_seen("a@sender.example")
            await dns_server.wait_for_query("_dmarc.sender.example", "TXT")
            await dns_server.wait_for_query("sender.example", "TXT")
            check.cancel()
        # The nursery closed without waiting for the 60 s DNS timeout.


async def test_transaction_end_leaves_the_connection_nursery_alone(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    """Cancelling one transaction's check does not cancel its sibling tasks."""
    dns_server.silent("sender.example")
    auth = authenticator(timeout=60)
    sibling_finished = trio.Event()

    async def sibling() -> None:
        await trio.testing.wait_all_tasks_blocked()
        sibling_finished.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sibling)
            check = auth.begin(
                nursery, client_ip=BAD_IP, helo="h.example", mail_from="a@sender.example"
            )
            await dns_server.wait_for_query("sender.example", "TXT")
            check.cancel()
    assert sibling_finished.is_set()


async def test_concurrent_transactions_share_the_cache(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("sender.example", f"v=spf1 ip4:{GOOD_IP} -all")
    dns_server.txt("_dmarc.sender.example", "v=DMARC1; p=reject")
    auth = authenticator(Mode.ENFORCE)
    verdicts = []

    async def one() -> None:
        async with trio.open_nursery() as nursery:
            check = auth.begin(nursery, client_ip=GOOD_IP, helo="h", mail_from="a@sender.example")
            verdicts.append(await check.verdict(message("a@sender.example")))

    await one()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)

    assert len(verdicts) == 11
    assert not any(v.refuse for v in verdicts)
    assert dns_server.count("sender.example", "TXT") == 1
    assert dns_server.count("_dmarc.sender.example", "TXT") == 1


async def test_announced_domains_never_crowd_out_the_message_from(
    dns_server: DnsServer, authenticator: Factory
) -> None:
    dns_server.txt("_dmarc.bank.example", "v=DMARC1; p=reject")
    auth = authenticator()
    async with trio.open_nursery() as nursery:
        check = auth.begin(nursery, client_ip=BAD_IP, helo="h.example", mail_from="a@x.example")
        check.from_header_seen(", ".join(f"a@d{n}.example" for n in range(20)))
        verdict = await check.verdict(message("a@bank.example"))

    assert verdict.refuse
    assert dns_server.count("_dmarc.d15.example", "TXT") == 0
