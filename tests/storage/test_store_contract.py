"""The storage contract: what every backend must do, run against each of them."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import attrs
import pytest
import trio

from relate_smtp.handlers.message import build_email
from relate_smtp.storage import (
    AddressTaken,
    AdminStore,
    RecipientRow,
    SavedEmail,
    StoredEmail,
    StoreError,
    TooLong,
    User,
    UserNotFound,
)
from relate_smtp.storage.records import (
    FILE_NAME_MAX,
    MESSAGE_ID_MAX,
    RECIPIENT_BCC,
    RECIPIENT_CC,
    RECIPIENT_TO,
    SUBJECT_MAX,
)
from tests.storage.helpers import TABLES, RawAccess, attachment, bcc, cc, new_email, to


async def make_user(store: AdminStore, email: str, *aliases: str) -> User:
    return await store.create_user(email, display_name=None, aliases=aliases)


async def add_key(store: AdminStore, user: User, prefix: str, *, name: str = "laptop") -> uuid.UUID:
    key = await store.create_api_key(
        user.id, name=name, key_hash=f"$2b$12${prefix}", key_prefix=prefix, scopes='["smtp"]'
    )
    return key.id


async def stored(store: AdminStore, saved: SavedEmail) -> StoredEmail:
    email = await store.get_email(saved.id)
    assert email is not None
    return email


def recipients(email: StoredEmail) -> Counter[RecipientRow]:
    return Counter(email.recipients)


# --- users -------------------------------------------------------------------------


async def test_find_user_by_primary_address_ignores_case(store: AdminStore) -> None:
    alice = await store.create_user("Alice@Example.com", display_name="Alice", aliases=())

    for address in ("Alice@Example.com", "alice@example.com", "ALICE@EXAMPLE.COM"):
        assert await store.find_user_by_address(address) == alice
    assert alice.email == "Alice@Example.com"
    assert alice.display_name == "Alice"
    assert await store.find_user_by_address("bob@example.com") is None


async def test_find_user_by_alias_verified_or_not(store: AdminStore, raw: RawAccess) -> None:
    """SPEC §4: the platform adds additional addresses unverified and cannot verify them;
    the original's GetByEmailAsync ignores IsVerified."""
    alice = await make_user(store, "alice@example.com", "Sales@Example.com")
    await raw.add_alias(alice.id, "Pending@Example.com", verified=False)

    assert await store.find_user_by_address("sales@example.com") == alice
    assert await store.find_user_by_address("SALES@example.COM") == alice
    assert await store.find_user_by_address("pending@example.com") == alice
    assert await store.find_user_by_address("PENDING@example.com") == alice


async def test_primary_address_wins_over_another_users_alias(
    store: AdminStore, raw: RawAccess
) -> None:
    alice = await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    await raw.add_alias(alice.id, "bob@example.com", verified=True)
    await raw.add_alias(alice.id, "BOB@example.com", verified=False)

    assert await store.find_user_by_address("bob@example.com") == bob
    assert await store.user_addresses(alice.id) == ("alice@example.com",)


async def test_user_addresses_are_primary_and_aliases_lower_cased(
    store: AdminStore, raw: RawAccess
) -> None:
    alice = await make_user(store, "Alice@Example.com", "Sales@Example.com")
    await raw.add_alias(alice.id, "Pending@example.com", verified=False)
    await make_user(store, "bob@example.com", "bob-alias@example.com")

    addresses = await store.user_addresses(alice.id)

    assert addresses[0] == "alice@example.com"
    assert sorted(addresses) == ["alice@example.com", "pending@example.com", "sales@example.com"]
    assert await store.user_addresses(uuid.uuid4()) == ()


# --- API keys ----------------------------------------------------------------------


async def test_candidate_api_keys_by_prefix_and_legacy_null_prefix(
    store: AdminStore, raw: RawAccess
) -> None:
    alice = await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    matching = await add_key(store, alice, "rk_aaaaaaaaa")
    await add_key(store, alice, "rk_bbbbbbbbb")
    revoked = await add_key(store, alice, "rk_aaaaaaaaa", name="old")
    assert await store.revoke_api_key(revoked)
    legacy = await raw.add_legacy_api_key(alice.id, key_hash="$2a$11$legacy", scopes='["smtp"]')
    await add_key(store, bob, "rk_aaaaaaaaa")

    candidates = await store.candidate_api_keys(alice.id, "rk_aaaaaaaaa")

    assert {key.id for key in candidates} == {matching, legacy}
    by_id = {key.id: key for key in candidates}
    assert by_id[legacy].key_prefix is None
    assert by_id[legacy].key_hash == "$2a$11$legacy"
    assert by_id[matching].key_prefix == "rk_aaaaaaaaa"
    assert by_id[matching].scopes == '["smtp"]'
    assert all(key.user_id == alice.id and key.revoked_at is None for key in candidates)


async def test_candidate_api_keys_excludes_revoked_legacy_keys(
    store: AdminStore, raw: RawAccess
) -> None:
    alice = await make_user(store, "alice@example.com")
    legacy = await raw.add_legacy_api_key(alice.id, key_hash="$2a$11$legacy", scopes="[]")
    assert await store.revoke_api_key(legacy)

    assert await store.candidate_api_keys(alice.id, "rk_anything0") == []


async def test_a_key_created_without_prefix_is_a_candidate_for_any_prefix(
    store: AdminStore,
) -> None:
    alice = await make_user(store, "alice@example.com")

    key = await store.create_api_key(
        alice.id, name="old", key_hash="$2a$10$x", key_prefix=None, scopes='["SMTP"]'
    )

    assert key.key_prefix is None
    assert await store.candidate_api_keys(alice.id, "rk_whatever0") == [key]


async def test_touch_api_keys_sets_last_used_at(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    first = await add_key(store, alice, "rk_111111111")
    second = await add_key(store, alice, "rk_222222222")
    untouched = await add_key(store, alice, "rk_333333333")
    when = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    elsewhere = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))

    await store.touch_api_keys({first: when, second: elsewhere})
    await store.touch_api_keys({})

    last_used = {key.id: key.last_used_at for key in await store.list_api_keys(alice.id)}
    assert last_used == {first: when, second: elsewhere, untouched: None}


# --- saving mail -------------------------------------------------------------------


async def test_save_email_round_trips_every_field(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    sender = await make_user(store, "sender@example.com")
    email = new_email(
        message_id="abc.123@sender.example",
        from_address="sender@example.com",
        from_display_name="Sénder Ünicode",
        subject="Quarterly numbers ✓",
        text_body="plain\r\nbody",
        html_body="<p>html body</p>",
        received_at=datetime(2024, 3, 9, 8, 7, 6, 543210, tzinfo=UTC),
        size_bytes=98765,
        in_reply_to="unknown-parent@elsewhere.example",
        references="<root@elsewhere.example> <unknown-parent@elsewhere.example>",
        sent_by_user_id=sender.id,
        header_recipients=(to("alice@example.com", "Alice"), cc("carol@remote.example")),
        envelope_recipients=("alice@example.com",),
        attachments=(attachment("report.pdf", b"%PDF-1.7\x00\xff"),),
    )

    saved = await store.save_email(email)
    got = await stored(store, saved)

    assert saved == SavedEmail(id=email.id, thread_id=None, linked_user_ids=(alice.id,))
    assert got == StoredEmail(
        id=email.id,
        message_id="abc.123@sender.example",
        from_address="sender@example.com",
        from_display_name="Sénder Ünicode",
        subject="Quarterly numbers ✓",
        text_body="plain\r\nbody",
        html_body="<p>html body</p>",
        received_at=datetime(2024, 3, 9, 8, 7, 6, 543210, tzinfo=UTC),
        size_bytes=98765,
        in_reply_to="unknown-parent@elsewhere.example",
        references="<root@elsewhere.example> <unknown-parent@elsewhere.example>",
        thread_id=None,
        sent_by_user_id=sender.id,
        recipients=got.recipients,
        attachments=(attachment("report.pdf", b"%PDF-1.7\x00\xff"),),
    )
    assert recipients(got) == Counter(
        [
            RecipientRow(
                address="alice@example.com", display_name="Alice", type="To", user_id=alice.id
            ),
            RecipientRow(
                address="carol@remote.example", display_name=None, type="Cc", user_id=None
            ),
        ]
    )


async def test_save_email_keeps_null_bodies_and_empty_display_name(store: AdminStore) -> None:
    email = new_email(text_body=None, html_body=None, from_display_name="")

    got = await stored(store, await store.save_email(email))

    assert got.text_body is None
    assert got.html_body is None
    assert got.from_display_name == ""
    assert got.recipients == ()
    assert got.attachments == ()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", ""),
        ("References: no ids here\r\n", ""),
        ("References: <a@x.example>\r\n <b@x.example>\r\n", "<a@x.example> <b@x.example>"),
    ],
)
async def test_references_column_is_empty_string_without_ids(
    store: AdminStore, raw: RawAccess, header: str, expected: str
) -> None:
    """SPEC §5: MimeKit's References list is never null, so the original stored "" for a
    message without one; the platform may rely on the column being non-null."""
    raw_message = (
        f"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\n{header}\r\nHi\r\n"
    ).encode()
    email = build_email(
        raw_message,
        envelope_recipients=("b@example.org",),
        sent_by_user_id=None,
        max_attachment_size=1 << 20,
    )

    saved = await store.save_email(email)

    assert await raw.email_references(saved.id) == expected
    assert (await stored(store, saved)).references == expected


async def test_received_at_in_another_zone_is_the_same_instant(store: AdminStore) -> None:
    when = datetime(2024, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=5)))

    got = await stored(store, await store.save_email(new_email(received_at=when)))

    assert got.received_at == when
    assert got.received_at.utcoffset() == timedelta(0)


async def test_envelope_only_user_gets_a_linked_bcc_row(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    email = new_email(
        header_recipients=(to("alice@example.com"),),
        envelope_recipients=("alice@example.com", "Bob@Example.com"),
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (alice.id, bob.id)
    assert recipients(await stored(store, saved)) == Counter(
        [
            RecipientRow(
                address="alice@example.com", display_name=None, type=RECIPIENT_TO, user_id=alice.id
            ),
            RecipientRow(
                address="Bob@Example.com", display_name=None, type=RECIPIENT_BCC, user_id=bob.id
            ),
        ]
    )


async def test_header_only_local_user_is_not_linked(store: AdminStore) -> None:
    await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    email = new_email(
        header_recipients=(to("alice@example.com"), cc("bob@example.com")),
        envelope_recipients=("bob@example.com",),
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (bob.id,)
    assert recipients(await stored(store, saved)) == Counter(
        [
            RecipientRow(
                address="alice@example.com", display_name=None, type=RECIPIENT_TO, user_id=None
            ),
            RecipientRow(
                address="bob@example.com", display_name=None, type=RECIPIENT_CC, user_id=bob.id
            ),
        ]
    )


async def test_no_envelope_user_means_nothing_linked(store: AdminStore) -> None:
    await make_user(store, "alice@example.com")
    email = new_email(
        header_recipients=(to("alice@example.com"),), envelope_recipients=("x@remote.example",)
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == ()
    assert [r.user_id for r in (await stored(store, saved)).recipients] == [None]


async def test_each_user_is_linked_once(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com", "sales@example.com")
    email = new_email(
        header_recipients=(
            to("alice@example.com"),
            cc("ALICE@example.com"),
            bcc("sales@example.com"),
        ),
        envelope_recipients=("alice@example.com", "sales@example.com"),
    )

    saved = await store.save_email(email)
    rows = (await stored(store, saved)).recipients

    assert saved.linked_user_ids == (alice.id,)
    assert len(rows) == 3
    assert [r.user_id for r in rows].count(alice.id) == 1
    assert next(r for r in rows if r.user_id == alice.id).type == RECIPIENT_TO


async def test_alias_addresses_link_verified_or_not(store: AdminStore, raw: RawAccess) -> None:
    alice = await make_user(store, "alice@example.com", "Sales@Example.com")
    bob = await make_user(store, "bob@example.com")
    await raw.add_alias(bob.id, "Pending@Example.com", verified=False)
    email = new_email(
        header_recipients=(to("sales@example.com"), to("pending@example.com")),
        envelope_recipients=("SALES@example.com", "PENDING@example.com"),
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (alice.id, bob.id)
    assert recipients(await stored(store, saved)) == Counter(
        [
            RecipientRow(
                address="sales@example.com", display_name=None, type=RECIPIENT_TO, user_id=alice.id
            ),
            RecipientRow(
                address="pending@example.com", display_name=None, type=RECIPIENT_TO, user_id=bob.id
            ),
        ]
    )


async def test_envelope_only_unverified_alias_gets_a_linked_bcc_row(
    store: AdminStore, raw: RawAccess
) -> None:
    bob = await make_user(store, "bob@example.com")
    await raw.add_alias(bob.id, "pending@example.com", verified=False)
    email = new_email(
        header_recipients=(to("list@remote.example"),),
        envelope_recipients=("pending@example.com",),
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (bob.id,)
    assert recipients(await stored(store, saved)) == Counter(
        [
            RecipientRow(
                address="list@remote.example", display_name=None, type=RECIPIENT_TO, user_id=None
            ),
            RecipientRow(
                address="pending@example.com", display_name=None, type=RECIPIENT_BCC, user_id=bob.id
            ),
        ]
    )


async def test_primary_address_wins_when_linking(store: AdminStore, raw: RawAccess) -> None:
    """SPEC §4: an address that is one user's primary belongs to that user even if
    another lists it as additional, verified or not."""
    alice = await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    await raw.add_alias(alice.id, "Bob@Example.com", verified=False)
    email = new_email(
        header_recipients=(to("bob@example.com"),), envelope_recipients=("BOB@example.com",)
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (bob.id,)
    assert [r.user_id for r in (await stored(store, saved)).recipients] == [bob.id]


async def test_linked_user_ids_follow_row_order(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    bob = await make_user(store, "bob@example.com")
    carol = await make_user(store, "carol@example.com")
    email = new_email(
        header_recipients=(cc("carol@example.com"), to("alice@example.com")),
        envelope_recipients=("bob@example.com", "alice@example.com", "carol@example.com"),
    )

    saved = await store.save_email(email)

    assert saved.linked_user_ids == (carol.id, alice.id, bob.id)


# --- threads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_reply_to",
    [
        "parent@example.com",
        "<parent@example.com>",
        " <parent@example.com> ",
        # half-bracketed: each bracket is dropped on its own, in every store
        "<parent@example.com",
        "parent@example.com>",
    ],
)
async def test_reply_threads_under_the_parents_id(store: AdminStore, in_reply_to: str) -> None:
    parent = await store.save_email(new_email(message_id="parent@example.com"))

    reply = await store.save_email(new_email(in_reply_to=in_reply_to))

    assert parent.thread_id is None
    assert reply.thread_id == parent.id
    assert (await stored(store, reply)).thread_id == parent.id


async def test_reply_to_a_reply_keeps_the_thread(store: AdminStore) -> None:
    root = await store.save_email(new_email(message_id="root@example.com"))
    child = await store.save_email(
        new_email(message_id="child@example.com", in_reply_to="root@example.com")
    )

    grandchild = await store.save_email(new_email(in_reply_to="<child@example.com>"))

    assert child.thread_id == root.id
    assert grandchild.thread_id == root.id


@pytest.mark.parametrize("in_reply_to", ["parent@example.com", "<parent@example.com>"])
async def test_parent_stored_with_brackets_is_found(store: AdminStore, in_reply_to: str) -> None:
    parent = await store.save_email(new_email(message_id="<parent@example.com>"))

    reply = await store.save_email(new_email(in_reply_to=in_reply_to))

    assert reply.thread_id == parent.id


@pytest.mark.parametrize("in_reply_to", [None, "", "<>", "nobody@example.com"])
async def test_no_stored_parent_means_no_thread(store: AdminStore, in_reply_to: str | None) -> None:
    await store.save_email(new_email(message_id="parent@example.com"))

    reply = await store.save_email(new_email(in_reply_to=in_reply_to))

    assert reply.thread_id is None


# --- values too long or unclean ---------------------------------------------------


async def test_message_values_are_clipped_and_cleaned_rather_than_failing(
    store: AdminStore,
) -> None:
    """SPEC §5: respect the column lengths by truncating, never failing; text is stored
    without NUL and with lone surrogates as U+FFFD."""
    saved = await store.save_email(
        new_email(
            subject="s" * (SUBJECT_MAX + 50),
            message_id="m" * (MESSAGE_ID_MAX + 1),
            text_body="nul\x00here \ud800 lone",
            header_recipients=(to("x@remote.example", "N\x00ame"),),
            attachments=(attachment("f" * (FILE_NAME_MAX + 1), b"x"),),
            received_at=datetime(2024, 1, 1, 12, 0),  # naive: taken as UTC
        )
    )

    got = await stored(store, saved)
    assert got.subject == "s" * SUBJECT_MAX
    assert got.message_id == "m" * MESSAGE_ID_MAX
    assert got.text_body == "nulhere \ufffd lone"
    assert got.recipients[0].display_name == "Name"
    assert got.attachments[0].file_name == "f" * FILE_NAME_MAX
    assert got.received_at == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


# --- attachments -------------------------------------------------------------------


async def test_attachments_round_trip(store: AdminStore) -> None:
    files = (
        attachment("photo.jpg", bytes(range(256)) * 40, "image/jpeg"),
        attachment("notes.txt", "héllo\n".encode(), "text/plain"),
        attachment("empty.bin", b"", "application/octet-stream"),
    )

    got = await stored(store, await store.save_email(new_email(attachments=files)))

    assert Counter(got.attachments) == Counter(files)
    assert sorted(a.size_bytes for a in got.attachments) == [0, 7, 10240]


# --- transactions and concurrency --------------------------------------------------


async def test_concurrent_saves_are_each_stored_once(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    emails = [
        new_email(
            header_recipients=(to("alice@example.com"),), envelope_recipients=("alice@example.com",)
        )
        for _ in range(20)
    ]
    results: dict[uuid.UUID, SavedEmail] = {}

    async def save(email: Any) -> None:
        results[email.id] = await store.save_email(email)

    async with trio.open_nursery() as nursery:
        for email in emails:
            nursery.start_soon(save, email)

    assert set(results) == {email.id for email in emails}
    assert all(saved.linked_user_ids == (alice.id,) for saved in results.values())
    listed = await store.list_emails(limit=100)
    assert Counter(email.id for email in listed) == Counter(email.id for email in emails)


def _bad_attachment() -> Any:
    # FileName is NOT NULL in every backend, and attachments are inserted last, after
    # the Emails and EmailRecipients rows.
    return attrs.evolve(attachment("x.bin", b"x"), file_name=cast(str, None))


async def test_a_failed_save_leaves_no_rows(store: AdminStore, raw: RawAccess) -> None:
    await make_user(store, "alice@example.com")
    email = new_email(
        header_recipients=(to("alice@example.com"),),
        envelope_recipients=("alice@example.com",),
        attachments=(attachment("good.bin", b"good"), _bad_attachment()),
    )

    with pytest.raises(StoreError):
        await store.save_email(email)

    assert await store.get_email(email.id) is None
    for table in ("Emails", "EmailRecipients", "EmailAttachments"):
        assert await raw.count_rows(table) == 0


async def test_one_bad_message_among_concurrent_saves_fails_alone(
    store: AdminStore, raw: RawAccess
) -> None:
    good = [new_email(attachments=(attachment("a.bin", b"a"),)) for _ in range(19)]
    bad = new_email(attachments=(_bad_attachment(),))
    outcomes: dict[uuid.UUID, SavedEmail | Exception] = {}

    async def save(email: Any) -> None:
        try:
            outcomes[email.id] = await store.save_email(email)
        except StoreError as exc:
            outcomes[email.id] = exc

    async with trio.open_nursery() as nursery:
        for email in [*good[:10], bad, *good[10:]]:
            nursery.start_soon(save, email)

    assert isinstance(outcomes[bad.id], StoreError)
    assert all(isinstance(outcomes[email.id], SavedEmail) for email in good)
    assert await store.get_email(bad.id) is None
    assert await raw.count_rows("Emails") == 19
    assert await raw.count_rows("EmailAttachments") == 19


async def test_saving_the_same_id_twice_fails_and_keeps_the_first(store: AdminStore) -> None:
    email = new_email(subject="first")
    await store.save_email(email)

    with pytest.raises(StoreError):
        await store.save_email(attrs.evolve(email, subject="second"))

    first = await store.get_email(email.id)
    assert first is not None
    assert first.subject == "first"


# --- admin -------------------------------------------------------------------------


async def test_create_user_makes_a_cli_user_with_verified_aliases(
    store: AdminStore, raw: RawAccess
) -> None:
    user = await store.create_user(
        "dave@example.com", display_name="Dave", aliases=["d@example.com", "D@example.com"]
    )

    assert user.email == "dave@example.com"
    assert await raw.oidc_identity(user.id) == ("relate-smtp-cli", str(user.id))
    assert await store.find_user_by_address("d@example.com") == user
    assert await store.user_addresses(user.id) == ("dave@example.com", "d@example.com")


@pytest.mark.parametrize(
    ("email", "aliases"),
    [
        ("ALICE@example.com", ()),
        ("new@example.com", ("alice@example.com",)),
        ("sales@example.com", ()),
        ("new@example.com", ("Sales@example.com",)),
    ],
)
async def test_create_user_refuses_an_address_already_taken(
    store: AdminStore, email: str, aliases: tuple[str, ...]
) -> None:
    await make_user(store, "alice@example.com", "sales@example.com")

    with pytest.raises(AddressTaken, match="already belongs to a user") as raised:
        await store.create_user(email, display_name=None, aliases=aliases)

    assert raised.value.address.lower() in ("alice@example.com", "sales@example.com")

    assert await store.find_user_by_address("new@example.com") is None


@pytest.mark.parametrize(
    ("field", "limit", "email", "display_name", "aliases"),
    [
        ("email", 320, "a" * 309 + "@example.com", None, ()),
        ("display name", 500, "new@example.com", "n" * 501, ()),
        ("alias", 320, "new@example.com", None, ("ok@example.com", "b" * 309 + "@example.com")),
    ],
)
async def test_create_user_refuses_a_value_too_long_naming_field_and_limit(
    store: AdminStore,
    raw: RawAccess,
    field: str,
    limit: int,
    email: str,
    display_name: str | None,
    aliases: tuple[str, ...],
) -> None:
    """An administrative value is refused, never clipped: a clipped address is not the
    one the operator typed."""
    with pytest.raises(TooLong, match=f"^{field}: longer than {limit} characters$") as raised:
        await store.create_user(email, display_name=display_name, aliases=aliases)

    assert (raised.value.field, raised.value.limit) == (field, limit)
    assert await raw.count_rows("Users") == 0
    assert await raw.count_rows("UserEmailAddresses") == 0


async def test_create_user_accepts_values_of_exactly_the_column_length(store: AdminStore) -> None:
    email = "a" * 308 + "@example.com"
    user = await store.create_user(email, display_name="n" * 500, aliases=())

    assert await store.find_user_by_address(email) == user


@pytest.mark.parametrize(
    ("field", "limit", "changes"),
    [
        ("key name", 100, {"name": "k" * 101}),
        ("key hash", 128, {"key_hash": "h" * 129}),
        ("key prefix", 12, {"key_prefix": "rk_" + "p" * 10}),
        ("scopes", 500, {"scopes": '["' + "s" * 500 + '"]'}),
    ],
)
async def test_create_api_key_refuses_a_value_too_long_naming_field_and_limit(
    store: AdminStore, raw: RawAccess, field: str, limit: int, changes: dict[str, str]
) -> None:
    alice = await make_user(store, "alice@example.com")
    values = {
        "name": "laptop",
        "key_hash": "$2b$12$x",
        "key_prefix": "rk_aaaaaaaaa",
        "scopes": "[]",
    }

    with pytest.raises(TooLong, match=f"^{field}: longer than {limit} characters$"):
        await store.create_api_key(alice.id, **(values | changes))

    assert await raw.count_rows("SmtpApiKeys") == 0


async def test_create_user_with_a_taken_alias_writes_nothing(
    store: AdminStore, raw: RawAccess
) -> None:
    await make_user(store, "alice@example.com", "sales@example.com")

    with pytest.raises(AddressTaken) as raised:
        await store.create_user("new@example.com", display_name=None, aliases=["SALES@example.com"])

    assert raised.value.address == "SALES@example.com"
    assert await raw.count_rows("Users") == 1
    assert await raw.count_rows("UserEmailAddresses") == 1


async def test_api_key_lifecycle(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    before = datetime.now(UTC)

    key = await store.create_api_key(
        alice.id, name="phone", key_hash="$2b$12$hash", key_prefix="rk_abcdefghi", scopes="[]"
    )

    assert before - timedelta(seconds=1) <= key.created_at <= datetime.now(UTC)
    assert (key.user_id, key.name, key.key_hash, key.key_prefix, key.scopes) == (
        alice.id,
        "phone",
        "$2b$12$hash",
        "rk_abcdefghi",
        "[]",
    )
    assert await store.list_api_keys(alice.id) == [key]

    assert await store.revoke_api_key(key.id) is True
    assert await store.revoke_api_key(key.id) is False
    assert await store.revoke_api_key(uuid.uuid4()) is False
    (revoked,) = await store.list_api_keys(alice.id)
    assert revoked.revoked_at is not None
    assert attrs.evolve(revoked, revoked_at=None) == key


async def test_create_api_key_for_an_unknown_user_fails(store: AdminStore) -> None:
    with pytest.raises(UserNotFound, match="no user"):
        await store.create_api_key(
            uuid.uuid4(), name="x", key_hash="h", key_prefix="rk_000000000", scopes="[]"
        )


async def test_list_emails_most_recent_first_with_limit(store: AdminStore) -> None:
    alice = await make_user(store, "alice@example.com")
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for minute in (5, 1, 3, 2, 4):
        await store.save_email(
            new_email(
                subject=f"minute {minute}",
                received_at=start + timedelta(minutes=minute),
                envelope_recipients=("alice@example.com",),
                attachments=(attachment("a.txt", b"a"),),
            )
        )

    listed = await store.list_emails(limit=3)

    assert [email.subject for email in listed] == ["minute 5", "minute 4", "minute 3"]
    assert all(email.attachments == () for email in listed)
    assert all([r.user_id for r in email.recipients] == [alice.id] for email in listed)
    assert len(await store.list_emails()) == 5


async def test_get_email_of_an_unknown_id_is_none(store: AdminStore) -> None:
    assert await store.get_email(uuid.uuid4()) is None


async def test_ping_and_pool_stats(store: AdminStore) -> None:
    await store.ping()

    stats = store.pool_stats()

    assert stats.maximum > 0
    assert 0 <= stats.active <= stats.maximum


async def test_tables_are_empty_at_the_start(raw: RawAccess) -> None:
    for table in TABLES:
        assert await raw.count_rows(table) == 0
