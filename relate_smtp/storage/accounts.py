"""The command line's users and API keys, validated once for both stores (SPEC §9).

An administrative value too long for its column is refused with :class:`TooLong`, which
names the field and the limit: unlike a message's values (clipped, SPEC §5), a clipped
address or key name would silently differ from what the operator typed. Addresses are
made case-insensitively distinct, primary first, as every lookup compares them.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Final

import attrs

from relate_smtp.storage.errors import AddressTaken, TooLong
from relate_smtp.storage.ids import new_id
from relate_smtp.storage.records import (
    DISPLAY_NAME_MAX,
    EMAIL_ADDRESS_MAX,
    KEY_HASH_MAX,
    KEY_NAME_MAX,
    KEY_PREFIX_MAX,
    SCOPES_MAX,
    ApiKey,
    User,
)

__all__ = ["CLI_OIDC_ISSUER", "AccountWrites", "NewUser", "new_api_key", "new_user", "refuse_taken"]

# SPEC §9: users made by `relate-smtp users add` have this OidcIssuer and their Id as
# OidcSubject.
CLI_OIDC_ISSUER: Final = "relate-smtp-cli"


def check_length(field: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise TooLong(field, limit)


@attrs.frozen(kw_only=True)
class NewUser:
    """A validated CLI user and the rows to insert: ``aliases`` pairs each additional
    address (stored verified) with its row id."""

    user: User
    created_at: datetime
    aliases: tuple[tuple[uuid.UUID, str], ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the user, lower-cased: what must not belong to anyone yet."""
        return (self.user.email.lower(), *(address.lower() for _, address in self.aliases))


def new_user(email: str, display_name: str | None, aliases: Collection[str]) -> NewUser:
    """Raises :class:`TooLong` naming the first value its column cannot hold."""
    check_length("email", email, EMAIL_ADDRESS_MAX)
    check_length("display name", display_name, DISPLAY_NAME_MAX)
    distinct = {email.lower(): email}
    for alias in aliases:
        check_length("alias", alias, EMAIL_ADDRESS_MAX)
        distinct.setdefault(alias.lower(), alias)
    user = User(id=uuid.uuid4(), email=email, display_name=display_name)
    return NewUser(
        user=user,
        created_at=_now(),
        aliases=tuple((new_id(), address) for address in list(distinct.values())[1:]),
    )


def refuse_taken(new: NewUser, owned: Collection[str]) -> None:
    """Raise :class:`AddressTaken` for the first address of ``new`` that is in ``owned``
    (lower-cased addresses some user already has)."""
    for address in (new.user.email, *(address for _, address in new.aliases)):
        if address.lower() in owned:
            raise AddressTaken(address)


def new_api_key(
    user_id: uuid.UUID, *, name: str, key_hash: str, key_prefix: str | None, scopes: str
) -> ApiKey:
    """The key row to insert; raises :class:`TooLong` for a value its column cannot hold.

    ``created_at`` is rounded to microseconds, as both databases store it, so the record
    equals what reads return.
    """
    check_length("key name", name, KEY_NAME_MAX)
    check_length("key hash", key_hash, KEY_HASH_MAX)
    check_length("key prefix", key_prefix, KEY_PREFIX_MAX)
    check_length("scopes", scopes, SCOPES_MAX)
    return ApiKey(
        id=uuid.uuid4(),
        user_id=user_id,
        name=name,
        key_hash=key_hash,
        key_prefix=key_prefix,
        scopes=scopes,
        created_at=_now(),
    )


def _now() -> datetime:
    return datetime.now(UTC)


class AccountWrites(abc.ABC):
    """``create_user`` and ``create_api_key`` of both stores: validated here, then
    written by the backend's ``_insert_user`` / ``_insert_api_key``."""

    async def create_user(
        self, email: str, *, display_name: str | None, aliases: Collection[str]
    ) -> User:
        """A CLI-made user (SPEC §9); raises :class:`TooLong` or :class:`AddressTaken`."""
        new = new_user(email, display_name, aliases)
        await self._insert_user(new)
        return new.user

    async def create_api_key(
        self,
        user_id: uuid.UUID,
        *,
        name: str,
        key_hash: str,
        key_prefix: str | None,
        scopes: str,
    ) -> ApiKey:
        """Raises :class:`TooLong` or :class:`~relate_smtp.storage.UserNotFound`."""
        key = new_api_key(
            user_id, name=name, key_hash=key_hash, key_prefix=key_prefix, scopes=scopes
        )
        await self._insert_api_key(key)
        return key

    @abc.abstractmethod
    async def _insert_user(self, new: NewUser) -> None:
        """Insert the user and its aliases in one transaction that first calls
        :func:`refuse_taken` with the addresses already owned."""

    @abc.abstractmethod
    async def _insert_api_key(self, key: ApiKey) -> None:
        """Insert the key; raise :class:`~relate_smtp.storage.UserNotFound` when its
        user does not exist."""
