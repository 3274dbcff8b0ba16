"""A small authoritative DNS server on loopback for the sender-authentication tests.

It answers over UDP and TCP on one port (TCP for truncated answers, RFC 7766), from
records each test sets, with an SOA in the authority section of negative answers so
resolvers cache them (RFC 2308 §5). Names can be made to answer SERVFAIL or never to
answer, and every query is recorded, so tests can assert what was asked and wait for a
query without sleeping.
"""

from __future__ import annotations

import socket
from collections import defaultdict

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

#: Negative answers are cached for this long unless a test says otherwise.
NEGATIVE_TTL = 300
_SOA = "ns.test. hostmaster.test. 1 3600 600 86400 {ttl}"


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


class DnsServer:
    """Records by (name, type); behaviour by name: ``servfail`` or ``silent``."""

    def __init__(self) -> None:
        self._records: dict[tuple[dns.name.Name, int], tuple[int, list[str]]] = {}
        self._broken: dict[dns.name.Name, str] = {}
        self.negative_ttl = NEGATIVE_TTL
        self.queries: list[tuple[str, str]] = []
        self._seen: dict[tuple[str, str], trio.Event] = defaultdict(trio.Event)
        self.port = 0
        self.tcp_queries = 0

    # -- what the tests configure ------------------------------------------------------

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Serve ``values`` (zone-file syntax) for ``name``/``rdtype``, replacing any."""
        self._records[(_name(name), dns.rdatatype.from_text(rdtype))] = (ttl, list(values))

    def txt(self, name: str, *texts: str, ttl: int = 300) -> None:
        """TXT records; texts longer than 255 octets are split into strings (RFC 1035)."""
        values = []
        for text in texts:
            chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
            values.append(" ".join('"' + c.replace('"', '\\"') + '"' for c in chunks))
        self.add(name, "TXT", *values, ttl=ttl)

    def remove(self, name: str, rdtype: str) -> None:
        self._records.pop((_name(name), dns.rdatatype.from_text(rdtype)), None)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for every type at ``name``."""
        self._broken[_name(name)] = "servfail"

    def silent(self, name: str) -> None:
        """Never answer for ``name``: the client times out."""
        self._broken[_name(name)] = "silent"

    def count(self, name: str, rdtype: str) -> int:
        key = (name.lower().rstrip("."), rdtype.upper())
        return sum(1 for query in self.queries if query == key)

    async def wait_for_query(self, name: str, rdtype: str) -> None:
        """Return once ``name``/``rdtype`` has been asked (now or earlier)."""
        await self._seen[(name.lower().rstrip("."), rdtype.upper())].wait()

    # -- answering -----------------------------------------------------------------------

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        key = (
            question.name.to_text(omit_final_dot=True).lower(),
            dns.rdatatype.to_text(question.rdtype),
        )
        self.queries.append(key)
        self._seen[key].set()
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        behaviour = self._broken.get(question.name)
        if behaviour == "silent":
            return None
        if behaviour == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        found = self._records.get((question.name, question.rdtype))
        if found is not None:
            ttl, values = found
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, "IN", question.rdtype, values)
            )
            return response
        if not any(name == question.name for name, _ in self._records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = _SOA.format(ttl=self.negative_ttl)
        response.authority.append(
            dns.rrset.from_text(dns.name.root, self.negative_ttl, "IN", "SOA", soa)
        )
        return response

    def _wire(self, data: bytes, *, limit: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        response = self._answer(query)
        if response is None:
            return None
        if limit is None:
            return response.to_wire()
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 1035 §4.2.1 / RFC 6891 §7: too big for UDP, the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    # -- serving -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind UDP and TCP on one loopback port, report it, answer until cancelled."""
        udp, tcp = await _bind_pair()
        with udp, tcp:
            self.port = udp.getsockname()[1]
            tcp.listen()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp)
                nursery.start_soon(self._serve_tcp, tcp, nursery)
                task_status.started(self.port)

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, peer = await sock.recvfrom(65535)
            query = _udp_payload(data)
            reply = self._wire(data, limit=query)
            if reply is not None:
                await sock.sendto(reply, peer)

    async def _serve_tcp(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(self._serve_tcp_client, trio.SocketStream(sock))

    async def _serve_tcp_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2]):
                    size = int.from_bytes(buffer[:2])
                    data, buffer = buffer[2 : 2 + size], buffer[2 + size :]
                    self.tcp_queries += 1
                    reply = self._wire(data, limit=None)
                    if reply is not None:
                        await stream.send_all(len(reply).to_bytes(2) + reply)


def _udp_payload(data: bytes) -> int:
    """The UDP size the client accepts: 512 without EDNS (RFC 1035), else its payload."""
    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return 512
    return max(512, query.payload) if query.edns >= 0 else 512


async def _bind_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP and a TCP socket on the same free loopback port (retrying if TCP's is taken)."""
    for _ in range(20):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError("no loopback port free for both UDP and TCP")
