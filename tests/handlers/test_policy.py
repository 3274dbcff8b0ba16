"""The MAIL/RCPT decision table of SPEC §4 and the address checks under it.

The store is an in-memory fake that counts lookups, so the tests can also say which
decisions touch the database (none for a foreign domain or ``postmaster``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

import attrs
import pytest

from relate_smtp.handlers.policy import (
    Envelope,
    MailboxFilter,
    Principal,
    has_relay_trick,
    normalize_domain,
)
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import (
    AUTH_REQUIRED,
    LOCAL_ERROR,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    UNKNOWN_USER,
    Reply,
)
from relate_smtp.storage import (
    ApiKey,
    NewEmail,
    PoolStats,
    SavedEmail,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
    User,
)

HOSTED = "hosted.example"
FULL_WIDTH = "\uff48\uff4f\uff53\uff54\uff45\uff44.example"  # full-width "hosted"
CYRILLIC_O = "h\u043ested.example"  # Cyrillic o (U+043E) in "hosted"
ALICE = User(id=uuid.UUID(int=1), email="alice@hosted.example")
PRINCIPAL = Principal(user_id=ALICE.id, address=ALICE.email)

SUBMISSION = ListenerKind.SUBMISSION
SUBMISSION_TLS = ListenerKind.SUBMISSION_TLS
MX = ListenerKind.MX


@attrs.define
class FakeStore:
    """Users by lower-cased address; ``fail`` makes every lookup raise it."""

    users: dict[str, User] = attrs.Factory(dict)
    fail: StoreError | None = None
    lookups: list[str] = attrs.Factory(list)

    async def find_user_by_address(self, address: str) -> User | None:
        self.lookups.append(address)
        if self.fail is not None:
            raise self.fail
        return self.users.get(address.lower())

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        return tuple(a for a, u in self.users.items() if u.id == user_id)

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        return ()

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        return None

    async def save_email(self, email: NewEmail) -> SavedEmail:
        raise AssertionError("the policy never stores mail")

    async def ping(self) -> None:
        return None

    def pool_stats(self) -> PoolStats:
        return PoolStats(active=0, maximum=1)

    async def aclose(self) -> None:
        return None


def make_filter(
    store: FakeStore | None = None,
    *,
    mx_enabled: bool = True,
    validate: bool = True,
    restrict: bool = False,
    domains: Sequence[str] = (HOSTED,),
) -> MailboxFilter:
    if store is None:
        store = FakeStore(users={ALICE.email: ALICE})
    return MailboxFilter(
        store=store,
        mx_enabled=mx_enabled,
        hosted_domains=domains,
        validate_recipients=validate,
        restrict_sender_to_login=restrict,
    )


def path(local: str, domain: str = HOSTED, route: tuple[str, ...] = ()) -> Envelope:
    return Envelope(local_part=local, domain=domain, source_route=route)


# ---- normalize_domain -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("hosted.example", "hosted.example"),
        ("HOSTED.Example", "hosted.example"),
        ("xn--exmple-cua.test", "xn--exmple-cua.test"),
        ("XN--EXMPLE-CUA.test", "xn--exmple-cua.test"),
        ("exämple.test", "xn--exmple-cua.test"),  # U-label and A-label are one name
        ("EXÄMPLE.test", "xn--exmple-cua.test"),
        ("hosted.example.", None),  # trailing dot
        ("", None),
        ("hosted..example", None),
        ("[127.0.0.1]", None),
        ("[IPv6:::1]", None),
        (FULL_WIDTH, None),  # full-width: IDNA would map it to hosted.example
        ("hosted\u3002example", None),  # ideographic full stop as a label separator
        ("hos\u00adted.example", None),  # soft hyphen, mapped away by IDNA
        ("straße.example", None),  # IDNA 2003 maps ß to ss
        ("hoste\u0301d.example", None),  # not NFC
        ("a" * 64 + ".example", "a" * 64 + ".example"),  # ASCII names pass as written
        ("ä" * 64 + ".example", None),  # an over-long label cannot be encoded
    ],
)
def test_normalize_domain(domain: str, expected: str | None) -> None:
    assert normalize_domain(domain) == expected


def test_look_alike_domain_normalises_to_another_name() -> None:
    """Cyrillic o (U+043E) is a different, valid IDN: it normalises, but not to the hosted name."""
    cyrillic = normalize_domain(CYRILLIC_O)
    assert cyrillic is not None
    assert cyrillic.startswith("xn--")
    assert cyrillic != HOSTED


# ---- has_relay_trick --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("envelope", "trick"),
    [
        (path("alice"), False),
        (path("alice.smith+tag"), False),
        (path('"alice smith"'), False),
        (path("alice%foreign.example"), True),
        (path("foreign.example!alice"), True),
        (path('"alice@foreign.example"'), True),
        (path('"alice%foreign.example"'), True),
        (path('"alice\\@foreign.example"'), True),
        (path("alice", route=("foreign.example",)), True),
        (path("alice", "foreign.example", route=(HOSTED,)), True),
    ],
)
def test_has_relay_trick(envelope: Envelope, trick: bool) -> None:
    assert has_relay_trick(envelope) is trick


# ---- configuration ----------------------------------------------------------------------


def test_hosted_domains_are_normalised_once() -> None:
    policy = make_filter(domains=("Hosted.Example.", "exämple.test", "XN--EXMPLE-CUA.test"))
    assert policy.hosted_domains == frozenset({HOSTED, "xn--exmple-cua.test"})


@pytest.mark.parametrize("bad", ["[192.0.2.1]", "", "a..example"])
def test_hosted_domain_that_is_no_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="hosted domain"):
        make_filter(domains=(bad,))


# ---- the decision table -----------------------------------------------------------------

# (mx enabled, authenticated, listener) → (MAIL reply, RCPT reply for a foreign address)
TABLE: list[tuple[bool, bool, ListenerKind, Reply | None, Reply | None]] = [
    (False, False, SUBMISSION, None, None),
    (False, False, SUBMISSION_TLS, None, None),
    (False, True, SUBMISSION, None, None),
    (False, True, SUBMISSION_TLS, None, None),
    (True, True, SUBMISSION, None, None),
    (True, True, SUBMISSION_TLS, None, None),
    (True, False, SUBMISSION, AUTH_REQUIRED, AUTH_REQUIRED),
    (True, False, SUBMISSION_TLS, AUTH_REQUIRED, AUTH_REQUIRED),
    (True, False, MX, None, RELAY_DENIED),
]


@pytest.mark.parametrize(("mx_enabled", "authenticated", "listener", "mail", "rcpt"), TABLE)
async def test_decision_table(
    mx_enabled: bool,
    authenticated: bool,
    listener: ListenerKind,
    mail: Reply | None,
    rcpt: Reply | None,
) -> None:
    policy = make_filter(mx_enabled=mx_enabled)
    principal = PRINCIPAL if authenticated else None
    assert await policy.check_sender(listener, principal, "someone@foreign.example") == mail
    foreign = path("bob", "foreign.example")
    assert await policy.check_recipient(listener, principal, foreign) == rcpt


async def test_null_sender_accepted_on_mx() -> None:
    assert await make_filter().check_sender(MX, None, "") is None


@pytest.mark.parametrize(
    ("envelope", "validate", "expected"),
    [
        (path("alice"), True, None),
        (path("ALICE", "Hosted.EXAMPLE"), True, None),
        (path("nobody"), True, UNKNOWN_USER),
        (path("nobody"), False, None),
        (path("postmaster", ""), True, None),
        (path("PostMaster", ""), True, None),
        (path("postmaster"), True, None),
        (path("POSTMASTER", "HOSTED.EXAMPLE"), True, None),
        (path("alice", ""), True, RELAY_DENIED),  # only postmaster may omit the domain
        (path("postmaster", "foreign.example"), True, RELAY_DENIED),
        (path("postmaster", "[127.0.0.1]"), True, RELAY_DENIED),
        (path("postmaster%foreign.example"), True, RELAY_DENIED),
        (path("alice", "foreign.example"), False, RELAY_DENIED),
        (path("alice", "sub.hosted.example"), False, RELAY_DENIED),
        (path("alice", "xhosted.example"), False, RELAY_DENIED),
        (path("alice", "hosted.example.foreign.example"), False, RELAY_DENIED),
        (path("alice", "hosted.example."), False, RELAY_DENIED),
        (path("alice", "[127.0.0.1]"), False, RELAY_DENIED),
        (path("alice", "[IPv6:::1]"), False, RELAY_DENIED),
        (path("alice", CYRILLIC_O), False, RELAY_DENIED),
        (path("alice", FULL_WIDTH), False, RELAY_DENIED),
        (path("alice%foreign.example"), False, RELAY_DENIED),
        (path("foreign.example!alice"), False, RELAY_DENIED),
        (path('"alice@foreign.example"'), False, RELAY_DENIED),
        (path("alice", route=("foreign.example",)), False, RELAY_DENIED),
        (path("alice", "foreign.example", route=(HOSTED,)), False, RELAY_DENIED),
        # Not unquoted: the session records the address as written, so accepting it as
        # alice would store mail that links to nobody.
        (path('"alice"'), True, UNKNOWN_USER),
    ],
)
async def test_inbound_recipient(
    envelope: Envelope, validate: bool, expected: Reply | None
) -> None:
    assert await make_filter(validate=validate).check_recipient(MX, None, envelope) == expected


@pytest.mark.parametrize(
    ("envelope", "looked_up"),
    [
        (path("Alice", "HOSTED.example"), ["Alice@HOSTED.example"]),
        (
            path("dora", "ex\u00e4mple.test"),
            ["dora@ex\u00e4mple.test", "dora@xn--exmple-cua.test"],
        ),
        (
            path("dora", "xn--exmple-cua.test"),
            ["dora@xn--exmple-cua.test", "dora@ex\u00e4mple.test"],
        ),
    ],
)
async def test_lookup_tries_the_written_form_then_the_other_label_form(
    envelope: Envelope, looked_up: list[str]
) -> None:
    """The store compares case-insensitively, so case variants cost no extra lookup; an
    IDN is also tried in its other label form."""
    store = FakeStore()
    policy = make_filter(store, domains=(HOSTED, "xn--exmple-cua.test"))
    assert await policy.check_recipient(MX, None, envelope) == UNKNOWN_USER
    assert store.lookups == looked_up


@pytest.mark.parametrize(
    "envelope",
    [
        path("alice", "foreign.example"),
        path("alice%foreign.example"),
        path("postmaster"),
        path("postmaster", ""),
    ],
)
async def test_no_database_lookup_needed(envelope: Envelope) -> None:
    """Foreign domains and postmaster are decided without the database: they cannot fail
    with 451 during an outage, and foreign probes cost nothing."""
    store = FakeStore(fail=StoreUnavailable("down"))
    await make_filter(store).check_recipient(MX, None, envelope)
    assert store.lookups == []


@pytest.mark.parametrize(
    "error", [StoreUnavailable("down"), SchemaMissing("no tables"), StoreError("odd")]
)
async def test_database_error_is_temporary(error: StoreError) -> None:
    policy = make_filter(FakeStore(fail=error))
    assert await policy.check_recipient(MX, None, path("alice")) == LOCAL_ERROR


@pytest.mark.parametrize(
    ("sender", "restrict", "expected"),
    [
        ("alice@hosted.example", True, None),
        ("ALICE@Hosted.Example", True, None),
        ("alias@hosted.example", True, None),
        ("bob@hosted.example", True, SENDER_NOT_OWNED),
        ("alice@foreign.example", True, SENDER_NOT_OWNED),
        ("", True, SENDER_NOT_OWNED),
        ("bob@hosted.example", False, None),
        ("", False, None),
    ],
)
async def test_sender_login_match(sender: str, restrict: bool, expected: Reply | None) -> None:
    own = ("alice@hosted.example", "alias@hosted.example")
    policy = make_filter(restrict=restrict)
    for listener in (SUBMISSION, SUBMISSION_TLS):
        assert await policy.check_sender(listener, PRINCIPAL, sender, own) == expected
