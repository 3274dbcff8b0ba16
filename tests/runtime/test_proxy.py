"""PROXY protocol v1/v2: parsing, incremental reads, refusals, deadline, trusted peers."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relate_smtp.runtime.proxy import (
    LOCAL_V2_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    is_trusted,
    parse_proxy_header,
    read_proxy_header,
)


def v2(command: int, family_proto: int, block: bytes, *, version: int = 2) -> bytes:
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family_proto])
        + struct.pack("!H", len(block))
        + block
    )


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(0x1, 0x11, block + tlvs)


def v2_inet6(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )
    return v2(0x1, 0x21, block + tlvs)


# PP2_TYPE_ALPN ("smtp") and PP2_TYPE_AUTHORITY, as a balancer might append.
TLVS = b"\x01\x00\x04smtp" + b"\x02\x00\x10mail.example.com"


class ChunkStream(trio.abc.ReceiveStream):
    """Hands out the given chunks one per read, then EOF (or blocks forever)."""

    def __init__(self, chunks: list[bytes], *, then_block: bool = False) -> None:
        self._chunks = list(chunks)
        self._then_block = then_block

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._chunks:
            chunk = self._chunks.pop(0)
            assert max_bytes is None or len(chunk) <= max_bytes
            return chunk
        if self._then_block:
            await trio.sleep_forever()
        return b""

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------------------- v1


def test_v1_tcp4() -> None:
    raw = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n"
    assert parse_proxy_header(raw + b"EHLO x\r\n") == ProxyHeader(
        version=1, client=("192.0.2.10", 56324), consumed=len(raw)
    )


def test_v1_tcp6() -> None:
    raw = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 25\r\n"
    assert parse_proxy_header(raw) == ProxyHeader(
        version=1, client=("2001:db8::1", 65535), consumed=len(raw)
    )


def test_v1_tcp6_ipv4_mapped_client_is_reported_as_ipv4() -> None:
    raw = b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::2 1000 25\r\n"
    header = parse_proxy_header(raw)
    assert header is not None
    assert header.client == ("192.0.2.7", 1000)


@pytest.mark.parametrize("raw", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_keeps_socket_peer(raw: bytes) -> None:
    assert parse_proxy_header(raw) == ProxyHeader(version=1, client=None, consumed=len(raw))


def test_v1_longest_valid_header_is_accepted() -> None:
    raw = (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(raw) == 104
    header = parse_proxy_header(raw)
    assert header is not None and header.consumed == 104


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY v1 protocol"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not ASCII"),
        (b"PROXY " + b"X" * 120, "longer than 107"),
        (b"EHLO client.example\r\n", "did not start with a PROXY"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "did not start with a PROXY"),
    ],
)
def test_v1_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(raw)


def test_v1_line_of_108_bytes_is_refused_before_its_end_arrives() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (107 - 14)
    assert len(line) == 107
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse_proxy_header(line)
    assert parse_proxy_header(line[:-1]) is None


# ---------------------------------------------------------------------------- v2


def test_local_v2_header_constant_is_the_documented_16_bytes() -> None:
    assert LOCAL_V2_HEADER == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert parse_proxy_header(LOCAL_V2_HEADER) == ProxyHeader(version=2, client=None, consumed=16)


def test_v2_inet_with_tlvs() -> None:
    raw = v2_inet("203.0.113.9", "10.0.0.5", 40000, 25, TLVS)
    assert parse_proxy_header(raw + b"EHLO") == ProxyHeader(
        version=2, client=("203.0.113.9", 40000), consumed=len(raw)
    )


def test_v2_inet6_with_tlvs() -> None:
    raw = v2_inet6("2001:db8::dead:beef", "2001:db8::1", 443, 587, TLVS)
    assert parse_proxy_header(raw) == ProxyHeader(
        version=2, client=("2001:db8::dead:beef", 443), consumed=len(raw)
    )


def test_v2_local_ignores_any_address_block() -> None:
    block = socket.inet_aton("1.1.1.1") * 2 + b"\x00\x01\x00\x02"
    raw = v2(0x0, 0x11, block)
    assert parse_proxy_header(raw) == ProxyHeader(version=2, client=None, consumed=len(raw))


@pytest.mark.parametrize("family_proto", [0x00, 0x31])
def test_v2_proxy_without_tcp_addresses_keeps_socket_peer(family_proto: int) -> None:
    raw = v2(0x1, family_proto, bytes(216 if family_proto == 0x31 else 0))
    assert parse_proxy_header(raw) == ProxyHeader(version=2, client=None, consumed=len(raw))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (v2(0x1, 0x11, bytes(12), version=1), "version 1"),
        (v2(0x1, 0x11, bytes(12), version=3), "version 3"),
        (v2(0x2, 0x11, bytes(12)), "unknown PROXY v2 command"),
        (v2(0x1, 0x41, bytes(12)), "address family"),
        (v2(0x1, 0x13, bytes(12)), "address family"),
        (v2(0x1, 0x12, bytes(12)), "datagram"),
        (v2(0x1, 0x10, bytes(12)), "unspecified"),
        (v2(0x1, 0x11, bytes(11)), "too short"),
        (v2(0x1, 0x21, bytes(12)), "too short"),
        (V2_SIGNATURE + b"\x21\x11\x10\x01", "exceeds 4096"),
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c", "did not start"),
    ],
)
def test_v2_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(raw)


def test_v2_needs_the_whole_address_block() -> None:
    raw = v2_inet("203.0.113.9", "10.0.0.5", 1, 2, TLVS)
    for end in range(len(raw)):
        assert parse_proxy_header(raw[:end]) is None


# ---------------------------------------------------------------------------- reading

SAMPLES = [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 25\r\n",
    b"PROXY UNKNOWN\r\n",
    LOCAL_V2_HEADER,
    v2_inet("203.0.113.9", "10.0.0.5", 40000, 25, TLVS),
    v2_inet6("2001:db8::dead:beef", "2001:db8::1", 443, 587, TLVS),
]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(
    header=st.sampled_from(SAMPLES),
    after=st.binary(max_size=64),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
async def test_any_split_gives_the_same_header_and_leftover(
    header: bytes, after: bytes, cuts: list[int]
) -> None:
    data = header + after
    expected = parse_proxy_header(data)
    assert expected is not None and expected.consumed == len(header)
    got, leftover = await read_proxy_header(ChunkStream(split(data, cuts)), timeout=5)
    assert got == expected
    # The header may end mid-chunk; everything after it must come back, and nothing
    # is read past the chunk that completed the header.
    assert after.startswith(leftover)
    assert leftover == after[: len(leftover)]


async def test_leftover_bytes_are_returned() -> None:
    header = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n"
    stream = ChunkStream([header[:10], header[10:] + b"EHLO a\r\nMAIL FROM:<>\r\n"])
    got, leftover = await read_proxy_header(stream, timeout=5)
    assert got.client == ("192.0.2.10", 56324)
    assert leftover == b"EHLO a\r\nMAIL FROM:<>\r\n"


async def test_eof_mid_header_is_an_error() -> None:
    header = v2_inet("203.0.113.9", "10.0.0.5", 1, 2)
    with pytest.raises(ProxyProtocolError, match="closed before a complete"):
        await read_proxy_header(ChunkStream([header[:20]]), timeout=5)


async def test_eof_before_anything_is_an_error() -> None:
    with pytest.raises(ProxyProtocolError, match="closed before a complete"):
        await read_proxy_header(ChunkStream([]), timeout=5)


async def test_smtp_from_an_unproxied_client_is_refused_on_first_read() -> None:
    with pytest.raises(ProxyProtocolError, match="did not start"):
        await read_proxy_header(ChunkStream([b"EHLO x\r\n"], then_block=True), timeout=5)


async def test_silent_peer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    with pytest.raises(ProxyProtocolError, match="within 3 s"):
        await read_proxy_header(ChunkStream([b"PROXY TCP4 "], then_block=True), timeout=3)
    assert trio.current_time() - start == pytest.approx(3)


async def test_reads_over_a_real_stream_pair() -> None:
    send, receive = trio.testing.memory_stream_pair()
    header = v2_inet6("2001:db8::7", "2001:db8::1", 5000, 25)

    async def client() -> None:
        for byte in header:
            await send.send_all(bytes([byte]))
        await send.send_all(b"QUIT\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        got, leftover = await read_proxy_header(receive, timeout=5)
    assert got.client == ("2001:db8::7", 5000)
    rest = leftover
    while len(rest) < len(b"QUIT\r\n"):
        rest += await receive.receive_some()
    assert rest == b"QUIT\r\n"


# ---------------------------------------------------------------------------- trust

NETWORKS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("::ffff:10.9.9.9", True),
        ("::ffff:11.9.9.9", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_is_trusted(peer: str, trusted: bool) -> None:
    assert is_trusted(peer, NETWORKS) is trusted


def test_nothing_is_trusted_without_networks() -> None:
    assert not is_trusted("127.0.0.1", ())


def test_scoped_ipv6_peer_matches_its_network() -> None:
    assert is_trusted("fe80::1%eth0", [ipaddress.ip_network("fe80::/10")])
