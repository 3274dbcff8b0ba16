"""What a store raises, by kind, so that callers can tell a user's mistake from a bug.

Every failure a store reports on purpose is a :class:`StoreError`. The command line
prints these (and only these) as messages; anything else escaping a store is a bug and
is left to surface with its traceback.
"""

from __future__ import annotations

import uuid


class StoreError(Exception):
    """Base class of storage failures."""


class StoreUnavailable(StoreError):
    """A transient failure (database down, connection dropped, disk full, lock timeout).

    Callers answer 4xx (451 4.3.0, 454 4.7.0) so the client retries; never 5xx.
    """


class SchemaMissing(StoreError):
    """The database is reachable but lacks the Relate tables (run ``relate-smtp db init``)."""


class InvalidInput(StoreError):
    """An administrative value the columns cannot hold; nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TooLong(InvalidInput):
    """A value longer than its column (SPEC §8); refused rather than clipped, because
    a clipped address or key name is not what the operator asked for."""

    def __init__(self, field: str, limit: int) -> None:
        super().__init__(field, f"longer than {limit} characters")
        self.limit = limit


class AddressTaken(StoreError):
    """The address is already a user's primary or additional address; mail for it would
    otherwise be delivered ambiguously."""

    def __init__(self, address: str) -> None:
        super().__init__(f"address {address!r} already belongs to a user")
        self.address = address


class UserNotFound(StoreError):
    """No user has the given id."""

    def __init__(self, user_id: uuid.UUID) -> None:
        super().__init__(f"no user with id {user_id}")
        self.user_id = user_id
