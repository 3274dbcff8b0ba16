"""The asyncio example drives the same core: a real smtplib client sends through it.

The test functions are plain (not async), so pytest-trio leaves them alone: each runs
its own asyncio loop with ``asyncio.run`` and the blocking client in a worker thread.
"""

from __future__ import annotations

import ast
import asyncio
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Final

from examples.asyncio_server import ReceivedMessage, serve

EXAMPLE: Final = Path(__file__).parent.parent / "examples" / "asyncio_server.py"
MESSAGE: Final = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: through asyncio\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".this line starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"Bye\r\n"
)


def _send(port: int) -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes]]:
    """Submit MESSAGE with AUTH PLAIN; return smtplib's refusals and the QUIT reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("pipelining")
        client.user, client.password = "alice", "s3cret"
        client.auth("PLAIN", client.auth_plain)  # AUTH PLAIN with initial response
        refused = client.sendmail(
            "alice@example.org", ["bob@example.com", "carol@example.com"], MESSAGE
        )
        return refused, client.quit()


async def _scenario() -> tuple[list[ReceivedMessage], tuple[int, bytes]]:
    received: list[ReceivedMessage] = []
    server = await serve("127.0.0.1", 0, on_message=received.append)
    async with server:
        port = server.sockets[0].getsockname()[1]
        refused, quit_reply = await asyncio.wait_for(asyncio.to_thread(_send, port), 30)
        assert refused == {}
    return received, quit_reply


def test_smtplib_message_through_the_asyncio_server() -> None:
    received, quit_reply = asyncio.run(_scenario())
    assert quit_reply[0] == 221
    [message] = received
    assert message.data == MESSAGE  # dot-stuffed by smtplib, unstuffed by the core
    assert message.sender == "alice@example.org"
    assert message.recipients == ("bob@example.com", "carol@example.com")
    assert message.username == "alice"
    assert message.helo == "client.example"


def test_example_imports_no_trio() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "trio" not in imported and "trio_asyncio" not in imported
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='example')\n"
        "assert not any(m == 'trio' or m.startswith('trio.') for m in sys.modules), 'trio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
