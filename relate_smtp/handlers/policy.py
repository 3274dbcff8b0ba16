"""MAIL and RCPT decisions: the original host's mailbox filter, made exact (SPEC §4).

One table decides every listener and authentication state; the MX rules never let
mail for a foreign domain through, whatever form the address takes.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Collection

import attrs

from relate_smtp.protocol import (
    AUTH_REQUIRED,
    LOCAL_ERROR,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    UNKNOWN_USER,
    Reply,
)
from relate_smtp.storage import Store, StoreUnavailable

log = logging.getLogger("relate_smtp.policy")

POSTMASTER = "postmaster"


class ListenerKind(enum.Enum):
    SUBMISSION = "submission"
    SUBMISSION_TLS = "submission-tls"
    MX = "mx"


@attrs.frozen(kw_only=True)
class Envelope:
    """What the policy needs to know about a path: the core's parse of it."""

    local_part: str
    domain: str
    source_route: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Principal:
    """The authenticated user of a session, if any."""

    user_id: uuid.UUID
    address: str


def normalize_domain(domain: str) -> str | None:
    """The one normalisation applied before comparing domains: lower case, A-labels.

    Returns None for anything that is not a plain DNS name (address literals, a
    trailing dot, empty labels) and for Unicode names that IDNA would change by
    mapping (full-width or compatibility look-alikes), so such forms never match.
    """
    if not domain or domain.startswith("[") or domain.endswith(".") or ".." in domain:
        return None
    if domain.isascii():
        return domain.lower()
    lowered = domain.lower()
    try:
        ascii_form = lowered.encode("idna").decode("ascii")
        round_trip = ascii_form.encode("ascii").decode("idna")
    except UnicodeError:
        return None
    if round_trip != lowered:
        return None
    return ascii_form


def has_relay_trick(path: Envelope) -> bool:
    """Forms that route mail onward through a local-looking address (percent hack,
    bang path, source route, an ``@`` hidden in a quoted local part)."""
    if path.source_route:
        return True
    return any(ch in path.local_part for ch in "%!@")


@attrs.frozen(kw_only=True)
class MailboxFilter:
    """SPEC §4 for one server: which senders and recipients each listener accepts."""

    store: Store
    mx_enabled: bool
    hosted_domains: frozenset[str]
    validate_recipients: bool
    restrict_sender_to_login: bool

    async def check_sender(
        self,
        listener: ListenerKind,
        principal: Principal | None,
        address: str,
        user_addresses: Collection[str] = (),
    ) -> Reply | None:
        """None accepts the sender; a Reply rejects it."""
        if principal is not None:
            if self.restrict_sender_to_login and address.lower() not in user_addresses:
                return SENDER_NOT_OWNED
            return None
        if self.mx_enabled and listener is not ListenerKind.MX:
            return AUTH_REQUIRED
        return None

    async def check_recipient(
        self, listener: ListenerKind, principal: Principal | None, path: Envelope
    ) -> Reply | None:
        """None accepts the recipient; a Reply rejects it."""
        if principal is not None or not self.mx_enabled:
            return None
        if listener is not ListenerKind.MX:
            return AUTH_REQUIRED
        return await self._check_inbound(path)

    async def _check_inbound(self, path: Envelope) -> Reply | None:
        if has_relay_trick(path):
            return RELAY_DENIED
        if not path.domain:
            # RFC 5321 §4.1.1.3: the bare "postmaster" needs no domain.
            return None if path.local_part.lower() == POSTMASTER else RELAY_DENIED
        domain = normalize_domain(path.domain)
        if domain is None or domain not in self.hosted_domains:
            return RELAY_DENIED
        if path.local_part.lower() == POSTMASTER or not self.validate_recipients:
            return None
        try:
            user = await self.store.find_user_by_address(f"{path.local_part}@{domain}")
        except StoreUnavailable as exc:
            log.warning("recipient check failed (database): %s", exc)
            return LOCAL_ERROR
        return None if user is not None else UNKNOWN_USER
