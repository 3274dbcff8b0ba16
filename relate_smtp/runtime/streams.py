"""Stream helpers for the session: replaying bytes that were read ahead."""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first returns ``prefix`` and then reads from ``inner``.

    Bytes that arrive in the same read as a PROXY header belong to what follows it
    (SMTP commands, or a TLS ClientHello on an implicit-TLS listener), so they are
    handed back before the socket is read again.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Half-close when the inner stream can (a TCP socket), else close it whole."""
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()
        else:
            await self._inner.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()
