"""The store interface the handlers are written against, and its errors.

Two backends implement it: :mod:`relate_smtp.storage.sqlite` (embedded default) and
:mod:`relate_smtp.storage.postgres` (production). Every method is a plain Trio async
function; blocking drivers and event-loop bridges stay inside the backend.

What the backends share lives beside this module, so that a message or a user is
stored the same way whichever database holds it: :mod:`.records` (records, column
limits, the linking rule), :mod:`.values` (clipping and cleaning a message),
:mod:`.accounts` (validating the command line's users and keys), :mod:`.ids`
(UUIDv7), :mod:`.groupcommit` (the pending-save queue) and :mod:`.errors`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import attrs

from relate_smtp.storage.errors import (
    AddressTaken,
    InvalidInput,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
    TooLong,
    UserNotFound,
)
from relate_smtp.storage.records import (
    ApiKey,
    Attachment,
    HeaderRecipient,
    NewEmail,
    RecipientRow,
    SavedEmail,
    StoredEmail,
    User,
    link_recipients,
)

__all__ = [
    "AddressTaken",
    "AdminStore",
    "ApiKey",
    "Attachment",
    "HeaderRecipient",
    "InvalidInput",
    "NewEmail",
    "PoolStats",
    "RecipientRow",
    "SavedEmail",
    "SchemaMissing",
    "ServerConnectionCounter",
    "ServerConnections",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredEmail",
    "TooLong",
    "User",
    "UserNotFound",
    "link_recipients",
]


@attrs.frozen(kw_only=True)
class PoolStats:
    active: int
    maximum: int


@attrs.frozen(kw_only=True)
class ServerConnections:
    """The database server's sessions on this database, and its ``max_connections``."""

    active: int
    maximum: int


@runtime_checkable
class ServerConnectionCounter(Protocol):
    """A store in front of a database server with a connection limit (PostgreSQL).

    What the ``connection-pool`` health check watches: every host sharing the database
    counts, and a busy local pool is normal under load (SPEC §7).
    """

    async def server_connections(self) -> ServerConnections:
        """Raises :class:`StoreError` when the server cannot tell."""
        ...


class Store(Protocol):
    """What the SMTP session needs from a database."""

    async def find_user_by_address(self, address: str) -> User | None:
        """The user whose primary address, or an additional address (verified or not, as
        the original's lookup), is ``address`` (case-insensitive); a primary address wins."""
        ...

    async def user_addresses(self, user_id: uuid.UUID) -> tuple[str, ...]:
        """The user's primary address and the additional addresses that belong to them
        (not another user's primary), lower-cased."""
        ...

    async def candidate_api_keys(self, user_id: uuid.UUID, prefix: str) -> Sequence[ApiKey]:
        """The user's non-revoked keys whose ``KeyPrefix`` is ``prefix`` or null (legacy)."""
        ...

    async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
        """Set ``LastUsedAt`` for many keys in one go."""
        ...

    async def save_email(self, email: NewEmail) -> SavedEmail:
        """Insert the e-mail, its recipients and attachments in one transaction.

        Resolves user links (:func:`link_recipients`) and the thread id (parent found by
        ``in_reply_to`` → parent's ThreadId or Id) inside that transaction. Raises
        :class:`StoreUnavailable` on transient failure, leaving nothing behind.
        """
        ...

    async def ping(self) -> None:
        """A trivial query; raises :class:`StoreUnavailable` when it fails."""
        ...

    def pool_stats(self) -> PoolStats: ...

    async def aclose(self) -> None: ...


class AdminStore(Store, Protocol):
    """Operations of the command line (``users``, ``keys``, ``mail``, ``db init``)."""

    async def init_schema(self) -> None:
        """Create the Relate tables and indexes that are absent; never drop or alter."""
        ...

    async def check_schema(self) -> None:
        """Raise :class:`SchemaMissing` when the tables this host uses are absent,
        :class:`StoreUnavailable` when the database cannot be reached."""
        ...

    async def create_user(
        self, email: str, *, display_name: str | None, aliases: Collection[str]
    ) -> User:
        """A user of the command line, its aliases verified (SPEC §9). Raises
        :class:`TooLong` for a value its column cannot hold and :class:`AddressTaken`
        when an address already belongs to a user; nothing is written then."""
        ...

    async def create_api_key(
        self,
        user_id: uuid.UUID,
        *,
        name: str,
        key_hash: str,
        key_prefix: str | None,
        scopes: str,
    ) -> ApiKey:
        """Raises :class:`TooLong` for a value its column cannot hold and
        :class:`UserNotFound` when no user has ``user_id``."""
        ...

    async def list_api_keys(self, user_id: uuid.UUID) -> Sequence[ApiKey]: ...

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        """Set ``RevokedAt``; False when no such (non-revoked) key exists."""
        ...

    async def list_emails(self, limit: int = 50) -> Sequence[StoredEmail]:
        """Most recent first, without bodies' attachments content."""
        ...

    async def get_email(self, email_id: uuid.UUID) -> StoredEmail | None: ...
