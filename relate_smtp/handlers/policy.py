"""MAIL and RCPT decisions: the original host's mailbox filter, made exact (SPEC §4).

One table decides every listener and authentication state; the MX rules never let
mail for a foreign domain through, whatever form the address takes.

The decision table (``check_sender`` / ``check_recipient``):

=============  ===============  ===================  ====================================
MX enabled     authenticated    listener             MAIL / RCPT
=============  ===============  ===================  ====================================
no             either           submission(-tls)     accept (the core enforces
                                                     ``Smtp:RequireAuthentication``)
yes            yes              any (MX: after TLS)  accept any sender and recipient
yes            no               submission(-tls)     530 5.7.0
yes            no               mx                   any sender; recipient: hosted domain
                                                     else 550 5.7.1, a user (if
                                                     ValidateRecipients) else 550 5.1.1,
                                                     ``postmaster`` always; 451 4.3.0 on
                                                     a database error
=============  ===============  ===================  ====================================

``Smtp:RestrictSenderToLogin`` narrows an authenticated sender to the user's own
addresses (553 5.7.1).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection

import attrs

from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import (
    AUTH_REQUIRED,
    LOCAL_ERROR,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    UNKNOWN_USER,
    Reply,
)
from relate_smtp.storage import Store, StoreError

log = logging.getLogger("relate_smtp.policy")

POSTMASTER = "postmaster"


@attrs.frozen(kw_only=True)
class Envelope:
    """What the policy needs to know about a path: the core's parse of it.

    ``local_part`` keeps its quotes as written and is never unquoted: the session
    records the address as written, so a lookup that unquoted it would accept a
    recipient the store could not link afterwards.
    """

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
    mapping (full-width or compatibility look-alikes, ``ß``, soft hyphens), so such
    forms never match a hosted domain: a name is hosted only when it is spelt the way
    it is configured, up to case and the U-label/A-label equivalence.
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


def _hosted_domains(domains: Collection[str]) -> frozenset[str]:
    """Configured domains in the form `normalize_domain` gives, so the comparison is
    exact whoever built the filter (settings already store them this way; one
    trailing dot, the DNS root, is tolerated in configuration). An entry that is not a
    domain name is refused rather than silently never matching."""
    result = set()
    for entry in domains:
        name = normalize_domain(entry.removesuffix("."))
        if name is None:
            raise ValueError(f"not a hosted domain name: {entry!r}")
        result.add(name)
    return frozenset(result)


def has_relay_trick(path: Envelope) -> bool:
    """Forms that route mail onward through a local-looking address: a source route,
    the percent hack (``a%b@hosted``), a bang path (``b!a@hosted``), and an ``@``,
    ``%`` or ``!`` inside a quoted local part (a backslash escape still leaves the
    character in the text, so ``"a\\@b"`` is caught too). Relays that honour any of
    these would send the mail on to a foreign domain, so none is accepted on MX."""
    if path.source_route:
        return True
    return any(ch in path.local_part for ch in "%!@")


@attrs.frozen(kw_only=True)
class MailboxFilter:
    """SPEC §4 for one server: which senders and recipients each listener accepts."""

    store: Store
    mx_enabled: bool
    hosted_domains: frozenset[str] = attrs.field(converter=_hosted_domains)
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
        reply, _ = await self.decide_recipient(listener, principal, path)
        return reply

    async def decide_recipient(
        self, listener: ListenerKind, principal: Principal | None, path: Envelope
    ) -> tuple[Reply | None, str | None]:
        """The reply (None accepts) and, for an accepted local user, the spelling of the
        address the user is stored under, which the session records so that the stored
        message links to them (None: record the address as written)."""
        if principal is not None or not self.mx_enabled:
            return None, None
        if listener is not ListenerKind.MX:
            return AUTH_REQUIRED, None
        return await self._check_inbound(path)

    async def _check_inbound(self, path: Envelope) -> tuple[Reply | None, str | None]:
        if has_relay_trick(path):
            return RELAY_DENIED, None
        if not path.domain:
            # RFC 5321 §4.1.1.3: the bare "postmaster" needs no domain.
            return (None if path.local_part.lower() == POSTMASTER else RELAY_DENIED), None
        domain = normalize_domain(path.domain)
        if domain is None or domain not in self.hosted_domains:
            return RELAY_DENIED, None
        if path.local_part.lower() == POSTMASTER or not self.validate_recipients:
            return None, None
        try:
            # The address as written first, then in the other label form of an IDN: a
            # user is linked by the exact spelling the session records, so the spelling
            # that found the user is the one to record.
            for address in _spellings(path.local_part, path.domain, domain):
                if await self.store.find_user_by_address(address) is not None:
                    return None, address
        except StoreError as exc:
            # Any database failure is the server's problem, never the sender's: a 5xx
            # here would bounce mail for a real user (SPEC §4), so the sender retries.
            log.warning("recipient check failed (database): %s", exc)
            return LOCAL_ERROR, None
        return UNKNOWN_USER, None


def _spellings(local_part: str, written: str, ascii_domain: str) -> list[str]:
    """``local@domain`` as written, with A-labels, and with U-labels (distinct)."""
    try:
        unicode_domain = ascii_domain.encode("ascii").decode("idna")
    except UnicodeError:
        unicode_domain = ascii_domain
    forms = [f"{local_part}@{d}" for d in (written, ascii_domain, unicode_domain)]
    # The stores compare case-insensitively: one lookup per spelling that differs otherwise.
    distinct: dict[str, str] = {}
    for form in forms:
        distinct.setdefault(form.lower(), form)
    return list(distinct.values())
