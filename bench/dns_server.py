"""``python -m bench.dns_server --txt NAME=TEXT ...``: TXT records served on loopback.

The MX scenarios' local DNS: the tests' authoritative server (tests/sender_auth/
dns_server.py, UDP and TCP on one port) in a process of its own, so its CPU is neither
the server's nor the generator's. It prints ``DNS listening on 127.0.0.1:<port>`` once
it answers, and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from tests.sender_auth.dns_server import DnsServer


async def serve(records: Sequence[tuple[str, str]]) -> None:
    server = DnsServer()
    for name, text in records:
        server.txt(name, text)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            print(f"DNS listening on 127.0.0.1:{port}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_server")
    parser.add_argument("--txt", action="append", default=[], metavar="NAME=TEXT")
    args = parser.parse_args(argv)
    records = [tuple(item.split("=", 1)) for item in args.txt]
    if any(len(record) != 2 for record in records):
        parser.error("--txt takes NAME=TEXT")
    trio.run(serve, [(name, text) for name, text in records])
    return 0


if __name__ == "__main__":
    sys.exit(main())
