"""Concurrent-session limits: overall and per client (SPEC §2).

"Per client" is per :func:`~relate_smtp.addresses.client_group`: an IPv4
address, or an IPv6 client's whole prefix (a /64 by default), since one IPv6 host can
take any address of its prefix and would otherwise get the limit once per address.

Like Postfix's smtpd_client_connection_count_limit, the per-client limit ignores exempt
networks (its $mynetworks), so local tooling and health probes are never shut out. The
exemption is decided on the real address, not the group, and exempt sessions are not
counted in their group: an exempt host never uses up its neighbours' share.
"""

from __future__ import annotations

from collections.abc import Iterable

from relate_smtp.addresses import client_group, in_networks
from relate_smtp.config import IPNetwork, SmtpSettings

DEFAULT_IPV6_PREFIX_LENGTH = SmtpSettings().client_ipv6_prefix_length
_GROUP_CACHE = 4096  # addresses remembered; forgotten all at once when full


class ConnectionLimiter:
    """Counts open sessions; ``try_acquire`` says whether one more may start."""

    def __init__(
        self,
        *,
        max_total: int,
        max_per_ip: int,
        exempt: Iterable[IPNetwork] = (),
        ipv6_prefix_length: int = DEFAULT_IPV6_PREFIX_LENGTH,
    ) -> None:
        self._max_total = max_total
        self._max_per_ip = max_per_ip
        self._exempt = tuple(exempt)
        self._ipv6_prefix_length = ipv6_prefix_length
        self._total = 0
        self._per_group: dict[str, int] = {}
        # Each session asks twice (acquire, release) and clients come back: parsing the
        # address and matching the exempt networks once per address is enough.
        self._groups: dict[str, str | None] = {}

    @property
    def total(self) -> int:
        return self._total

    def try_acquire(self, ip: str) -> bool:
        if self._max_total > 0 and self._total >= self._max_total:
            return False
        group = self._group(ip)
        if group is not None:
            count = self._per_group.get(group, 0)
            if self._max_per_ip > 0 and count >= self._max_per_ip:
                return False
            self._per_group[group] = count + 1
        self._total += 1
        return True

    def release(self, ip: str) -> None:
        self._total -= 1
        group = self._group(ip)
        if group is None:
            return
        count = self._per_group.get(group, 0) - 1
        if count > 0:
            self._per_group[group] = count
        else:
            self._per_group.pop(group, None)

    def _group(self, ip: str) -> str | None:
        """The group ``ip`` counts in, or None for an exempt address (never counted)."""
        try:
            return self._groups[ip]
        except KeyError:
            pass
        group = (
            None if in_networks(ip, self._exempt) else client_group(ip, self._ipv6_prefix_length)
        )
        if len(self._groups) >= _GROUP_CACHE:
            self._groups.clear()
        self._groups[ip] = group
        return group
