"""The room Trio leaves: a bare SMTP responder on Trio, no parsing beyond line ends.

``python -m bench.bare_trio --port 0`` prints ``Listening: submission on HOST:PORT
(none)`` on stderr, like relate-smtp, then answers every command with a canned reply
and discards message bodies. It is as fast as an SMTP server on Trio can be while still
doing one read per round trip and one task per connection, so the distance between it
and relate-smtp is what relate-smtp's own code costs.
"""

from __future__ import annotations

import argparse
import sys

import trio

_EHLO = b"250-bare.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 36700160\r\n"
_REPLIES = {
    b"EHLO": _EHLO,
    b"HELO": b"250 bare.example\r\n",
    b"MAIL": b"250 2.1.0 OK\r\n",
    b"RCPT": b"250 2.1.5 OK\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"RSET": b"250 2.0.0 OK\r\n",
    b"NOOP": b"250 2.0.0 OK\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}
_UNKNOWN = b"500 5.5.2 Unknown command\r\n"
_QUEUED = b"250 2.0.0 OK: queued\r\n"


async def _session(stream: trio.SocketStream) -> None:
    await stream.send_all(b"220 bare.example ESMTP\r\n")
    buffer = b""
    in_data = False
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        out: list[bytes] = []
        quit_seen = False
        while True:
            if in_data:
                end = buffer.find(b"\r\n.\r\n")
                if end < 0:
                    buffer = buffer[-4:]  # keep what may start the terminator
                    break
                buffer = buffer[end + 5 :]
                in_data = False
                out.append(_QUEUED)
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                break
            verb = buffer[:4].upper()
            buffer = buffer[end + 2 :]
            out.append(_REPLIES.get(verb, _UNKNOWN))
            if verb == b"DATA":
                in_data = True
                buffer = b"\r\n" + buffer  # the body may end at once: "\r\n.\r\n"
            elif verb == b"QUIT":
                quit_seen = True
                break
        if out:
            await stream.send_all(b"".join(out))
        if quit_seen:
            return


async def _main(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    host, bound = listeners[0].socket.getsockname()[:2]
    print(f"Listening: submission on {host}:{bound} (none)", file=sys.stderr, flush=True)
    await trio.serve_listeners(_session, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_trio")
    parser.add_argument("--port", type=int, default=0)
    trio.run(_main, parser.parse_args().port)


if __name__ == "__main__":
    main()
