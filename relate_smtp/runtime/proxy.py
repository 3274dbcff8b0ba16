"""PROXY protocol v1 and v2 (HAProxy's spec): the real client address behind a load balancer.

A listener named in ``Smtp:ProxyProtocol:Listeners`` expects every connection to open
with a PROXY header, sent by a peer in ``Smtp:ProxyProtocol:TrustedNetworks`` (SPEC §2,
§10). This module owns the wire format only: :func:`parse_proxy_header` is a pure
incremental parser, :func:`read_proxy_header` reads one header from a Trio stream under
a deadline, :func:`is_trusted` checks the peer. What to do with an untrusted peer or a
malformed header (close the connection) is the session's decision.

Reference: https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt (sections
2.1 for v1, 2.2 for v2).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Final, Literal

import attrs
import trio

from relate_smtp.addresses import in_networks, unmapped
from relate_smtp.config import IPNetwork

__all__ = [
    "LOCAL_V2_HEADER",
    "MAX_V1_LENGTH",
    "MAX_V2_ADDRESS_LENGTH",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "is_trusted",
    "parse_proxy_header",
    "read_proxy_header",
]


V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

# §2.1: "a receiver ... must not try to parse more than 107 characters", CRLF included.
MAX_V1_LENGTH: Final = 107
# §2.2: the 16-bit length allows 64 KiB of addresses and TLVs. Real balancers send a
# few dozen bytes of TLVs (AWS, GCP, haproxy's SSL info); 4 KiB bounds what an
# unauthenticated peer can make us buffer while leaving room for any of them.
MAX_V2_ADDRESS_LENGTH: Final = 4096
_V2_FIXED: Final = 16

_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_AF_UNSPEC: Final = 0x0
_AF_INET: Final = 0x1
_AF_INET6: Final = 0x2
_AF_UNIX: Final = 0x3
_PROTO_UNSPEC: Final = 0x0
_PROTO_STREAM: Final = 0x1
_PROTO_DGRAM: Final = 0x2
_INET_BLOCK: Final = struct.Struct("!4s4sHH")
_INET6_BLOCK: Final = struct.Struct("!16s16sHH")

# A v2 header with command LOCAL, family and protocol UNSPEC, no addresses: what a
# health probe (ours included) sends so that the listener keeps the socket's peer.
LOCAL_V2_HEADER: Final = V2_SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"

# How much one read may pull in; the parser bounds the total.
_RECEIVE_SIZE: Final = 4096


class ProxyProtocolError(Exception):
    """The connection did not start with a valid PROXY header; close it without a reply."""


@attrs.frozen(kw_only=True)
class ProxyHeader:
    """A parsed PROXY header."""

    version: Literal[1, 2]
    client: tuple[str, int] | None
    """The original client's (address, port); None for v1 UNKNOWN, v2 LOCAL and address
    families other than IPv4/IPv6, where the socket's own peer stands. An IPv4-mapped
    IPv6 address is given in its IPv4 form, so that limits key on one spelling."""
    consumed: int
    """How many bytes of the input the header took; the SMTP stream starts after them."""


def parse_proxy_header(buf: bytes) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``buf``.

    Returns None when ``buf`` is a valid beginning that needs more bytes, and raises
    :class:`ProxyProtocolError` as soon as the bytes cannot be a header (so a peer
    speaking SMTP directly is refused on its first read rather than at a timeout).
    """
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(V1_PREFIX):
        return _parse_v1(buf)
    if V2_SIGNATURE.startswith(buf) or V1_PREFIX.startswith(buf):
        return None
    raise ProxyProtocolError("connection did not start with a PROXY protocol header")


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(buf) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 header longer than {MAX_V1_LENGTH} bytes")
        return None
    if buf[end - 1 : end] != b"\r":
        raise ProxyProtocolError("PROXY v1 header does not end with CRLF")
    try:
        line = buf[: end - 1].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    consumed = end + 1
    fields = line.split(" ")
    # §2.1: "PROXY UNKNOWN" may carry anything after it; the receiver ignores it.
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(version=1, client=None, consumed=consumed)
    if len(fields) != 6:
        raise ProxyProtocolError(f"malformed PROXY v1 header: {line!r}")
    _, family, source, destination, source_port, destination_port = fields
    address_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
    if family == "TCP4":
        address_type = ipaddress.IPv4Address
    elif family == "TCP6":
        address_type = ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"unknown PROXY v1 protocol {family!r}")
    try:
        client_ip = address_type(source)
        address_type(destination)
    except ValueError:
        raise ProxyProtocolError(f"bad {family} address in PROXY v1 header: {line!r}") from None
    port = _v1_port(source_port, line)
    _v1_port(destination_port, line)
    return ProxyHeader(version=1, client=(str(unmapped(client_ip)), port), consumed=consumed)


def _v1_port(text: str, line: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or int(text) > 65535:
        raise ProxyProtocolError(f"bad port in PROXY v1 header: {line!r}")
    return int(text)


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < _V2_FIXED:
        return None
    version, command = buf[12] >> 4, buf[12] & 0x0F
    family, protocol = buf[13] >> 4, buf[13] & 0x0F
    (length,) = struct.unpack_from("!H", buf, 14)
    if version != 2:
        raise ProxyProtocolError(f"unsupported PROXY protocol version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"unknown PROXY v2 command {command:#x}")
    if family > _AF_UNIX or protocol > _PROTO_DGRAM:
        raise ProxyProtocolError(f"unknown PROXY v2 address family/protocol {buf[13]:#04x}")
    if length > MAX_V2_ADDRESS_LENGTH:
        raise ProxyProtocolError(
            f"PROXY v2 address block of {length} bytes exceeds {MAX_V2_ADDRESS_LENGTH}"
        )
    consumed = _V2_FIXED + length
    if len(buf) < consumed:
        return None
    # §2.2: with LOCAL the receiver uses the real connection endpoints and ignores the
    # address block (whatever the family says); UNSPEC and UNIX carry no usable TCP peer.
    if command == _V2_LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(version=2, client=None, consumed=consumed)
    if protocol != _PROTO_STREAM:
        kind = "datagram" if protocol == _PROTO_DGRAM else "unspecified"
        raise ProxyProtocolError(f"PROXY v2 header describes a {kind} connection, not TCP")
    block = _INET_BLOCK if family == _AF_INET else _INET6_BLOCK
    if length < block.size:
        raise ProxyProtocolError(
            f"PROXY v2 address block of {length} bytes is too short for its family"
        )
    # Whatever follows the addresses is TLVs (§2.2.7); nothing here needs them.
    source, _, source_port, _ = block.unpack_from(buf, _V2_FIXED)
    client_ip = ipaddress.ip_address(source)
    return ProxyHeader(version=2, client=(str(unmapped(client_ip)), source_port), consumed=consumed)


async def read_proxy_header(
    stream: trio.abc.ReceiveStream,
    *,
    timeout: float,  # noqa: ASYNC109 - expiry is a protocol error, not a cancellation
) -> tuple[ProxyHeader, bytes]:
    """Read the PROXY header that opens ``stream``.

    Returns the header and the bytes that arrived after it in the same reads, which
    belong to the SMTP conversation and must be fed to the protocol core first.
    Raises :class:`ProxyProtocolError` when the header is malformed, the peer closes
    before completing it, or it is not complete within ``timeout`` seconds (a peer
    that connects and says nothing must not hold a connection slot).
    """
    buf = b""
    with trio.move_on_after(timeout):
        while True:
            header = parse_proxy_header(buf)
            if header is not None:
                return header, buf[header.consumed :]
            chunk = await stream.receive_some(_RECEIVE_SIZE)
            if not chunk:
                raise ProxyProtocolError("connection closed before a complete PROXY header")
            buf += chunk
    raise ProxyProtocolError(f"no complete PROXY header within {timeout:g} s")


def is_trusted(peer_ip: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``peer_ip`` (the socket's peer) may send a PROXY header.

    An IPv4-mapped IPv6 peer (``::ffff:10.0.0.1``, seen on dual-stack sockets) matches
    IPv4 networks as its IPv4 address. An unparsable address is never trusted.
    """
    return in_networks(peer_ip, networks)
