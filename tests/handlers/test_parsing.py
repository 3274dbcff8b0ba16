"""Large messages are parsed in a worker process under CPU and memory limits."""

from __future__ import annotations

import base64

import pytest
import trio

from relate_smtp.handlers.limits import MimeLimits, ParseLimits
from relate_smtp.handlers.message import (
    PARSE_OFF_LOOP_ABOVE,
    AttachmentTooLarge,
    MimeLimitExceeded,
    build_email,
)
from relate_smtp.handlers.parsing import MessageParser, ParseTooCostly

ENVELOPE = ("postmaster@example.com",)


def with_attachment(size: int) -> bytes:
    content = base64.encodebytes(b"\x00\x01" * (size // 2)).replace(b"\n", b"\r\n")
    return (
        b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: big\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=data.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + content + b"--B--\r\n"
    )


async def parse(parser: MessageParser, raw: bytes) -> object:
    return await parser.parse(raw, envelope_recipients=ENVELOPE, sent_by_user_id=None)


async def test_a_large_message_parses_in_a_worker_as_it_would_inline() -> None:
    raw = with_attachment(200_000)
    assert len(raw) > PARSE_OFF_LOOP_ABOVE
    parser = MessageParser(max_attachment_size=1 << 20)
    email = await parse(parser, raw)
    inline = build_email(
        raw, envelope_recipients=ENVELOPE, sent_by_user_id=None, max_attachment_size=1 << 20
    )
    assert email.subject == inline.subject == "big"  # type: ignore[attr-defined]
    assert email.text_body == inline.text_body  # type: ignore[attr-defined]
    assert email.attachments == inline.attachments  # type: ignore[attr-defined]
    assert email.header_recipients == inline.header_recipients  # type: ignore[attr-defined]


async def test_the_event_loop_runs_while_a_worker_parses() -> None:
    ticks = 0

    async def tick(cancel: trio.CancelScope) -> None:
        nonlocal ticks
        with cancel:
            while True:
                await trio.sleep(0.005)
                ticks += 1

    parser = MessageParser(max_attachment_size=1 << 30)
    async with trio.open_nursery() as nursery:
        cancel = trio.CancelScope()
        nursery.start_soon(tick, cancel)
        await parse(parser, with_attachment(8_000_000))
        cancel.cancel()
    assert ticks >= 5


async def test_an_attachment_too_large_crosses_back_from_the_worker() -> None:
    parser = MessageParser(max_attachment_size=1000)
    with pytest.raises(AttachmentTooLarge) as caught:
        await parse(parser, with_attachment(200_000))
    assert caught.value.file_name == "data.bin" and caught.value.limit == 1000


async def test_a_mime_limit_crosses_back_from_the_worker() -> None:
    parts = b"".join(b"--B\r\n\r\n" + b"x" * 100 + b"\r\n" for _ in range(2000))
    raw = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + parts + b"--B--\r\n"
    assert len(raw) > PARSE_OFF_LOOP_ABOVE
    parser = MessageParser(max_attachment_size=1 << 20, mime_limits=MimeLimits(max_parts=50))
    with pytest.raises(MimeLimitExceeded, match="more than 50 MIME parts"):
        await parse(parser, raw)


async def test_a_parse_over_the_memory_limit_is_stopped_and_the_next_one_works() -> None:
    # Millions of empty lines in one part: the stdlib parser keeps a string per line.
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n\r\n"
        + b"\r\n" * 8_000_000
        + b"--B--\r\n"
    )
    limits = ParseLimits(memory_bytes=256 * 1024 * 1024, concurrency=1)
    parser = MessageParser(max_attachment_size=1 << 20, parse_limits=limits)
    with pytest.raises(ParseTooCostly, match="more than"):
        await parse(parser, raw)
    email = await parse(parser, with_attachment(200_000))
    assert email.subject == "big"  # type: ignore[attr-defined]


async def test_a_parse_over_the_cpu_limit_is_stopped_and_the_next_one_works() -> None:
    # format=flowed text is unwrapped a line at a time: millions of lines cost seconds.
    raw = b"Content-Type: text/plain; format=flowed\r\n\r\n" + b"a \r\n" * 8_000_000
    limits = ParseLimits(cpu_seconds=0.5, concurrency=1)
    parser = MessageParser(max_attachment_size=1 << 20, parse_limits=limits)
    with pytest.raises(ParseTooCostly, match="worker process ended"):
        await parse(parser, raw)
    email = await parse(parser, with_attachment(200_000))
    assert email.subject == "big"  # type: ignore[attr-defined]
