"""aiosmtpd as a discard sink: the comparison server, run as its own process.

``python -m bench.aiosmtpd_sink --port 0 [--auth USER:PASSWORD]`` prints
``Listening: submission on HOST:PORT (none)`` on stderr, like relate-smtp, then serves on
the main thread's event loop, as ``python -m aiosmtpd -n`` does. The hostname is fixed so
no connection pays a DNS look-up (``socket.getfqdn``), which would be unfair to aiosmtpd.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
import warnings
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class DiscardHandler:
    """Accepts every message and drops it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


def make_authenticator(user: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting one login (PLAIN/LOGIN)."""
    expected = LoginPassword(user.encode(), password.encode())

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data == expected
        return AuthResult(success=ok, handled=False)

    return authenticator


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aiosmtpd_sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require AUTH with this login")
    args = parser.parse_args()

    # as `python -m aiosmtpd` does; aiosmtpd warns on every AUTH session otherwise
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    options: dict[str, Any] = {"hostname": "localhost", "data_size_limit": 64 * 1024 * 1024}
    if args.auth:
        user, _, password = args.auth.partition(":")
        options.update(
            authenticator=make_authenticator(user, password),
            auth_required=True,
            auth_require_tls=False,
        )
    handler = DiscardHandler()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, loop=loop, **options), args.host, args.port, backlog=4096
        )
    )
    host, port = server.sockets[0].getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # as relate-smtp logs it
    print(f"Listening: submission on {where} (none)", file=sys.stderr, flush=True)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
