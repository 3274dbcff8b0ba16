"""Concurrent-session limits: overall and per client address (SPEC §2).

Like Postfix's smtpd_client_connection_count_limit, the per-address limit ignores
exempt networks (its $mynetworks), so local tooling and health probes are never shut out.
"""

from __future__ import annotations

from collections.abc import Iterable

from relate_smtp.config import IPNetwork
from relate_smtp.runtime.addresses import in_networks


class ConnectionLimiter:
    """Counts open sessions; ``try_acquire`` says whether one more may start."""

    def __init__(
        self, *, max_total: int, max_per_ip: int, exempt: Iterable[IPNetwork] = ()
    ) -> None:
        self._max_total = max_total
        self._max_per_ip = max_per_ip
        self._exempt = tuple(exempt)
        self._total = 0
        self._per_ip: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self._total

    def try_acquire(self, ip: str) -> bool:
        if self._max_total > 0 and self._total >= self._max_total:
            return False
        count = self._per_ip.get(ip, 0)
        if self._max_per_ip > 0 and count >= self._max_per_ip and not in_networks(ip, self._exempt):
            return False
        self._total += 1
        self._per_ip[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        self._total -= 1
        count = self._per_ip.get(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            self._per_ip.pop(ip, None)
