"""Lean SMTP load generator: raw sockets on one epoll loop, precomputed bytes, pipelining.

Each connection follows a fixed script of ``Step``s: one write, then a known number of
replies whose codes are checked. Latency per message is the time from the write that
ends the data (``CRLF.CRLF``) to its 250 reply. The generator's own CPU time
(``RUSAGE_SELF``) is part of every result so it can be compared with the server's.

Standalone use against any server::

    python -m bench.loadgen 127.0.0.1:2525 --connections 10 --seconds 5 --pipelined
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import gc
import os
import resource
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

KIB = 1024
_IN = select.EPOLLIN
_RECV = 262144
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Step:
    """One write followed by ``len(expect)`` replies; ``timed`` marks the end-of-data reply."""

    payload: bytes | None
    expect: tuple[bytes, ...]
    timed: int = -1


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What each connection does."""

    messages_per_connection: int = 1
    message_size: int = 2 * KIB
    pipelined: bool = True
    auth: tuple[str, str] | None = None
    sender: str = "bench-sender@example.com"
    recipient: str = "bench-rcpt@example.org"
    helo: str = "loadgen.example.com"
    #: Applied once to the message (e.g. a DKIM signature); every send is those bytes.
    sign: Callable[[bytes], bytes] | None = None


@dataclass(slots=True)
class Result:
    """Figures from one run of the generator."""

    messages: int = 0
    connections: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    message_size: int = 0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.msgs_per_s * self.message_size / 1e6

    @property
    def cpu_share(self) -> float:
        """Generator CPU as a fraction of one core over the run."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) in milliseconds; NaN without samples."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
        return ordered[index] / 1e6

    def note_error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text)


def make_message(size: int, sender: str, recipient: str) -> bytes:
    """A plain-text message of exactly ``size`` bytes (CRLF lines, nothing to dot-stuff)."""
    head = (
        f"From: Bench <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        "Subject: relate-smtp benchmark message\r\n"
        "Date: Tue, 4 Jun 2024 10:14:59 +0000\r\n"
        "Message-ID: <bench@loadgen.example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen.\r\n"
    room = max(0, size - len(head))
    body = line * (room // len(line))
    rest = room - len(body)
    if rest >= 2:
        body += b"x" * (rest - 2) + b"\r\n"
    elif rest:
        body = body[:-2] + b"x\r\n" if body else b"x"
    return head + body


def build_script(spec: LoadSpec) -> tuple[Step, ...]:
    """The steps of one connection, all bytes precomputed."""
    message = make_message(spec.message_size, spec.sender, spec.recipient)
    if spec.sign is not None:
        message = spec.sign(message)
    message += b".\r\n"
    mail = f"MAIL FROM:<{spec.sender}>\r\n".encode()
    rcpt = f"RCPT TO:<{spec.recipient}>\r\n".encode()
    data = b"DATA\r\n"
    quit_ = b"QUIT\r\n"
    steps: list[Step] = [
        Step(None, (b"220",)),
        Step(f"EHLO {spec.helo}\r\n".encode(), (b"250",)),
    ]
    if spec.auth is not None:
        user, password = spec.auth
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        steps.append(Step(f"AUTH PLAIN {token}\r\n".encode(), (b"235",)))
    n = spec.messages_per_connection
    if spec.pipelined:
        # RFC 2920: the body may open a group, so each end-of-data write also carries the
        # next transaction's MAIL/RCPT/DATA (or the final QUIT).
        steps.append(Step(mail + rcpt + data, (b"250", b"250", b"354")))
        for _ in range(n - 1):
            steps.append(Step(message + mail + rcpt + data, (b"250", b"250", b"250", b"354"), 0))
        steps.append(Step(message + quit_, (b"250", b"221"), 0))
    else:
        for _ in range(n):
            steps.append(Step(mail, (b"250",)))
            steps.append(Step(rcpt, (b"250",)))
            steps.append(Step(data, (b"354",)))
            steps.append(Step(message, (b"250",), 0))
        steps.append(Step(quit_, (b"221",)))
    return tuple(steps)


class _Conn:
    """State of one connection running the script."""

    __slots__ = ("buf", "out", "reply", "sent_at", "sock", "step")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.step = 0
        self.reply = 0
        self.buf = b""
        self.out: memoryview | None = None
        self.sent_at = 0


class _Engine:
    """A single-threaded epoll loop driving many ``_Conn``s through one script."""

    def __init__(self, host: str, port: int, script: tuple[Step, ...], result: Result) -> None:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.family, self.address = info[0], info[4]
        self.script = script
        self.result = result
        self.poll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.kept: list[socket.socket] = []

    def close(self) -> None:
        for conn in self.conns.values():
            conn.sock.close()
        self.conns.clear()
        self.poll.close()

    def _open(self) -> bool:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.result.note_error(f"connect: {os.strerror(err)}")
            return False
        fd = sock.fileno()
        # The greeting arrives only once connected, so wait for input straight away.
        self.poll.register(fd, _IN)
        self.conns[fd] = _Conn(sock)
        return True

    def _end(self, fd: int, conn: _Conn, error: str | None, keep: bool) -> None:
        self.poll.unregister(fd)
        del self.conns[fd]
        self.result.connections += 1
        if error is not None:
            self.result.note_error(error)
        if keep and error is None:
            self.kept.append(conn.sock)
        else:
            conn.sock.close()

    def _send(self, fd: int, conn: _Conn, payload: bytes | memoryview) -> None:
        try:
            sent = conn.sock.send(payload)
        except BlockingIOError:
            sent = 0
        if sent < len(payload):
            if conn.out is None:
                self.poll.modify(fd, _IN | select.EPOLLOUT)
            conn.out = memoryview(payload)[sent:]
            return
        if conn.out is not None:
            conn.out = None
            self.poll.modify(fd, _IN)
        conn.sent_at = time.perf_counter_ns()

    def _replies(self, fd: int, conn: _Conn, data: bytes) -> str | None:
        """Consume reply lines; returns "" when the script is done, an error text, or None."""
        buf = conn.buf + data if conn.buf else data
        script = self.script
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                conn.buf = buf[start:]
                return None
            line = buf[start:end]
            start = end + 2
            if len(line) > 3 and line[3] == 45:  # b"-": continuation line
                continue
            step = script[conn.step]
            index = conn.reply
            if line[:3] != step.expect[index]:
                return f"step {conn.step}: expected {step.expect[index].decode()}, got {line!r}"
            if index == step.timed:
                self.result.latencies_ns.append(time.perf_counter_ns() - conn.sent_at)
                self.result.messages += 1
            index += 1
            if index < len(step.expect):
                conn.reply = index
                continue
            conn.reply = 0
            conn.step += 1
            if conn.step >= len(script):
                return ""
            payload = script[conn.step].payload
            assert payload is not None
            self._send(fd, conn, payload)

    def run(self, connections: int, deadline: float, budget: int = -1, keep: bool = False) -> None:
        """Keep ``connections`` sessions going until ``deadline`` or ``budget`` sessions."""
        active = 0
        started = 0
        while active < connections and started != budget:
            started += 1
            active += self._open()
        poll, conns, monotonic = self.poll.poll, self.conns, time.monotonic
        while active:
            for fd, events in poll(1.0):
                conn = conns.get(fd)
                if conn is None:
                    continue
                outcome: str | None
                try:
                    if events & select.EPOLLOUT and conn.out is not None:
                        self._send(fd, conn, conn.out)
                    if not events & (_IN | select.EPOLLERR | select.EPOLLHUP):
                        continue
                    data = conn.sock.recv(_RECV)
                    if data:
                        outcome = self._replies(fd, conn, data)
                        if outcome is None:
                            continue
                    else:
                        outcome = f"step {conn.step}: connection closed by the server"
                except BlockingIOError:
                    continue
                except OSError as exc:
                    outcome = f"step {conn.step}: {exc}"
                self._end(fd, conn, outcome or None, keep)
                active -= 1
                if started != budget and monotonic() < deadline:
                    started += 1
                    active += self._open()
            if not active and started != budget and monotonic() < deadline:
                # every connect failed at once: back off, then try again
                time.sleep(0.05)
                started += 1
                active += self._open()


def raise_nofile(wanted: int) -> None:
    """Raise this process's open-file soft limit towards ``wanted`` (bounded by the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(
    host: str,
    port: int,
    spec: LoadSpec,
    *,
    connections: int,
    seconds: float | None = None,
    total_messages: int | None = None,
) -> Result:
    """Drive ``connections`` concurrent sessions for ``seconds`` or ``total_messages``.

    Sessions in flight at the deadline run to completion and count.
    """
    raise_nofile(connections + 256)
    result = Result(message_size=spec.message_size)
    engine = _Engine(host, port, build_script(spec), result)
    budget = -(-total_messages // spec.messages_per_connection) if total_messages else -1
    gc.collect()
    gc.freeze()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    try:
        deadline = time.monotonic() + seconds if seconds is not None else float("inf")
        engine.run(connections, deadline, budget)
    finally:
        result.wall_s = time.perf_counter() - t0
        result.cpu_s = _cpu_seconds() - cpu0
        gc.unfreeze()
        engine.close()
    return result


class IdleConnections:
    """Many sessions held open after the greeting and the EHLO reply."""

    def __init__(self, host: str, port: int, count: int, helo: str = "idle.example.com") -> None:
        self.count = count
        script = (Step(None, (b"220",)), Step(f"EHLO {helo}\r\n".encode(), (b"250",)))
        self.result = Result()
        self._engine = _Engine(host, port, script, self.result)
        self.sockets: list[socket.socket] = []

    def open(self, parallel: int = 100) -> None:
        """Open ``count`` sessions, ``parallel`` at a time; each has had EHLO's 250."""
        raise_nofile(self.count + 256)
        self._engine.run(parallel, float("inf"), budget=self.count, keep=True)
        self.sockets = self._engine.kept

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.send(b"QUIT\r\n")
            sock.close()
        self.sockets.clear()
        self._engine.close()


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run one load against HOST:PORT and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("target", help="HOST:PORT of the SMTP server")
    parser.add_argument("--connections", "-c", type=int, default=10)
    parser.add_argument("--seconds", "-t", type=float, default=5.0)
    parser.add_argument("--messages-per-connection", "-n", type=int, default=1)
    parser.add_argument("--size", type=int, default=2 * KIB, help="message size in bytes")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="AUTH PLAIN on every connection")
    args = parser.parse_args(argv)
    host, port = _parse_target(args.target)
    auth = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = (user, password)
    spec = LoadSpec(
        messages_per_connection=args.messages_per_connection,
        message_size=args.size,
        pipelined=not args.no_pipelining,
        auth=auth,
    )
    result = run_load(host, port, spec, connections=args.connections, seconds=args.seconds)
    print(
        f"{result.messages} messages in {result.wall_s:.2f} s: {result.msgs_per_s:,.0f} msg/s, "
        f"{result.mb_per_s:.1f} MB/s; latency p50 {result.percentile_ms(50):.2f} ms, "
        f"p99 {result.percentile_ms(99):.2f} ms; {result.errors} errors; "
        f"generator CPU {result.cpu_s:.2f} s ({result.cpu_share:.0%} of a core)"
    )
    for sample in result.error_samples:
        print(f"  error: {sample}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
