"""Settings of ``Smtp:Mx:SenderAuthentication``: one immutable record, validated once.

The configuration loader owns the keys; this module owns their meaning and defaults:

- ``Mode``: ``off`` | ``observe`` | ``enforce`` (default ``observe``: check, log and count,
  never refuse).
- ``DnsServers``: addresses with optional ports (``192.0.2.53``, ``192.0.2.53:5353``,
  ``2001:db8::53``, ``[2001:db8::53]:5353``); empty means the system resolver.
- ``DnsTimeoutSeconds``: bound on one DNS lookup (default 5).
- ``RejectSpfFail``: refuse SPF ``fail`` when the author domain publishes no DMARC record
  (default false; DMARC is the policy a domain chose, SPF alone breaks forwarding).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

import attrs

#: RFC 1035 §4.2: DNS over UDP and TCP listens on port 53.
DNS_PORT = 53
#: Default bound on one DNS lookup; RFC 7208 §4.6.4 leaves the value to the receiver.
DNS_TIMEOUT_SECONDS = 5.0


class Mode(enum.Enum):
    """What the MX listener does with the results."""

    #: Nothing is checked and no DNS query is sent.
    OFF = "off"
    #: Everything is checked, logged and counted; nothing is refused.
    OBSERVE = "observe"
    #: As ``observe``, and a DMARC ``p=reject`` failure is refused with 550 5.7.1.
    ENFORCE = "enforce"


@attrs.frozen(kw_only=True)
class NameServer:
    """One recursive resolver to ask, by IP address (RFC 1035 §4.2 transport)."""

    address: str = attrs.field(validator=lambda _i, _a, value: ipaddress.ip_address(value))
    port: int = attrs.field(
        default=DNS_PORT,
        validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)),
    )

    @classmethod
    def parse(cls, text: str) -> NameServer:
        """Read ``address``, ``address:port`` or ``[ipv6]:port``; raise ValueError if bad."""
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep:
                raise ValueError(f"unclosed bracket in DNS server {text!r}")
            if not rest:
                return cls(address=host)
            if not rest.startswith(":"):
                raise ValueError(f"bad DNS server {text!r}")
            return cls(address=host, port=_port(rest[1:], text))
        if text.count(":") == 1:
            host, _, port = text.partition(":")
            return cls(address=host, port=_port(port, text))
        return cls(address=text)


def _port(text: str, whole: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port in DNS server {whole!r}")
    return int(text)


def parse_name_servers(values: str | Iterable[str]) -> tuple[NameServer, ...]:
    """Read ``DnsServers``: a comma/space separated string or a list of entries."""
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    return tuple(NameServer.parse(value) for value in values if value.strip())


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen(kw_only=True)
class SenderAuthSettings:
    """``Smtp:Mx:SenderAuthentication``; defaults follow issue 15."""

    mode: Mode = Mode.OBSERVE
    dns_servers: tuple[NameServer, ...] = ()
    dns_timeout_seconds: float = attrs.field(default=DNS_TIMEOUT_SECONDS, validator=_positive)
    reject_spf_fail: bool = False
