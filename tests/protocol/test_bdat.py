"""CHUNKING / BDAT (RFC 3030): binary chunks, LAST, zero length, refusal, size."""

from __future__ import annotations

from relate_smtp.protocol import (
    MessageAborted,
    MessageChunk,
    MessageEnd,
    MessageStart,
    Reset,
    State,
)

from .helpers import check_transcript, feed, in_transaction, message_bytes, talk


def test_chunks_then_last() -> None:
    conn = in_transaction()
    events = check_transcript(
        conn,
        [
            (b"BDAT 5\r\nhello", ["250 2.0.0 5 octets received"]),
            (b"BDAT 6 LAST\r\n world", ["250 2.0.0 OK"]),
        ],
    )
    assert events[0] == MessageStart(chunked=True)
    assert message_bytes(events) == b"hello world"
    assert events[-1] == MessageEnd(size=11)
    assert conn.state is State.READY


def test_chunk_content_is_binary() -> None:
    payload = b"\r\n.\r\n..x\n\r\x00\xff"
    conn = in_transaction()
    events, lines = talk(conn, b"BDAT %d LAST\r\n" % len(payload) + payload)
    assert message_bytes(events) == payload  # no unstuffing, no end marker, no line rules
    assert lines == ["250 2.0.0 OK"]


def test_zero_length_last() -> None:
    conn = in_transaction()
    events, lines = talk(conn, b"BDAT 0 LAST\r\n")
    assert events == [MessageStart(chunked=True), MessageEnd(size=0)]
    assert lines == ["250 2.0.0 OK"]
    conn = in_transaction()
    events, lines = talk(conn, b"BDAT 3\r\nabcBDAT 0\r\nBDAT 0 last\r\n")
    assert lines == ["250 2.0.0 3 octets received", "250 2.0.0 0 octets received", "250 2.0.0 OK"]
    assert events[-1] == MessageEnd(size=3)


def test_in_message_between_chunks() -> None:
    conn = in_transaction()
    feed(conn, b"BDAT 2\r\nab")
    assert conn.in_message and conn.state is State.BDAT
    conn.data_to_send()
    _, lines = talk(conn, b"NOOP\r\n")
    assert lines == ["250 2.0.0 OK"]
    assert conn.in_message


def test_rset_between_chunks_drops_the_message() -> None:
    conn = in_transaction()
    feed(conn, b"BDAT 2\r\nab")
    conn.data_to_send()
    events, lines = talk(conn, b"RSET\r\n")
    assert events == [Reset()]
    assert lines == ["250 2.0.0 OK"]
    assert not conn.in_message


def test_chunk_split_across_reads() -> None:
    conn = in_transaction()
    data = b"BDAT 10 LAST\r\n0123456789NOOP\r\n"
    events = feed(conn, *[data[i : i + 3] for i in range(0, len(data), 3)])
    assert message_bytes(events) == b"0123456789"
    assert isinstance(events[-1], MessageEnd)


def test_data_after_bdat_is_out_of_sequence() -> None:
    conn = in_transaction()
    feed(conn, b"BDAT 1\r\nx")
    conn.data_to_send()
    _, lines = talk(conn, b"DATA\r\n")
    assert lines == ["503 5.5.1 Bad sequence of commands"]


def test_refused_bdat_still_consumes_its_chunk() -> None:
    conn = in_transaction()
    feed(conn, b"RSET\r\n")
    conn.data_to_send()
    # no transaction: refused, but "QUIT\r\n" inside the chunk must not run
    events, lines = talk(conn, b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert lines == ["503 5.5.1 Need MAIL command first", "250 2.0.0 OK"]
    assert not conn.closed
    assert not any(isinstance(e, MessageChunk) for e in events)


def test_bdat_when_chunking_is_off() -> None:
    conn = in_transaction(chunking=False)
    _, lines = talk(conn, b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert lines == ["502 5.5.1 Command not implemented", "250 2.0.0 OK"]


def test_bdat_syntax() -> None:
    conn = in_transaction()
    _, lines = talk(conn, b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 1 FIRST\r\n", b"BDAT -1\r\n")
    assert lines == ["501 5.5.4 Syntax: BDAT chunk-size [LAST]"] * 4
    assert conn.state is State.RCPT


def test_oversized_chunk_is_discarded_then_refused() -> None:
    conn = in_transaction(max_message_size=10)
    events, lines = talk(conn, b"BDAT 6\r\nabcdef", b"BDAT 6\r\nghijkl", b"NOOP\r\n")
    assert lines == [
        "250 2.0.0 6 octets received",
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert isinstance(events[-1], MessageAborted)
    assert message_bytes(events) == b"abcdef"  # the refused chunk was never delivered
    assert not conn.in_message
    assert conn.state is State.READY


def test_huge_chunk_is_streamed_away() -> None:
    conn = in_transaction(max_message_size=100)
    feed(conn, b"BDAT 5000000 LAST\r\n")
    block = b"x" * 1_000_000
    for _ in range(5):
        assert not any(isinstance(e, MessageChunk) for e in feed(conn, block))
    _, lines = talk(conn, b"NOOP\r\n")
    assert lines == ["552 5.3.4 Message size exceeds fixed maximum message size", "250 2.0.0 OK"]


def test_binarymime_with_bdat() -> None:
    conn = in_transaction()
    feed(
        conn,
        b"RSET\r\n",
        b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
        b"RCPT TO:<c@d.example>\r\n",
    )
    conn.data_to_send()
    events, lines = talk(conn, b"BDAT 2 LAST\r\n\x00\xff")
    assert lines == ["250 2.0.0 OK"]
    assert message_bytes(events) == b"\x00\xff"
