"""CPU cost of ``build_email`` per message (SPEC §5 budget: ≤ 250 µs for a 2 KiB message).

Run ``python bench/bench_message.py``; ``run()`` returns the numbers for ``nox -s bench``.
CPU time (``time.process_time``) is used so that a busy machine does not skew results.
"""

from __future__ import annotations

import time
import uuid

from relate_smtp.handlers.message import build_email

_PLAIN_BODY = (
    "Hi Bob,\r\n\r\n"
    + "Here are the notes from today's meeting, as promised. " * 30
    + "\r\n\r\nCheers,\r\nAlice\r\n"
)

TYPICAL = (
    "Return-Path: <alice@example.com>\r\n"
    "Received: from mail.example.com (mail.example.com [192.0.2.1])\r\n"
    "\tby mx.example.org with ESMTPS id 4F2A1B; Tue, 4 Jun 2024 10:15:00 +0000\r\n"
    "Date: Tue, 4 Jun 2024 10:14:59 +0000\r\n"
    'From: "Alice Example" <alice@example.com>\r\n'
    "To: Bob Example <bob@example.org>, carol@example.org\r\n"
    "Cc: Dave <dave@example.net>\r\n"
    "Message-ID: <20240604101459.12345@mail.example.com>\r\n"
    "Subject: Meeting notes for the quarterly planning session\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n" + _PLAIN_BODY
).encode()

_HALF = "Here are the notes from today's meeting, as promised. " * 13
ENCODED_ALTERNATIVE = (
    'From: "=?utf-8?q?J=C3=B6rg_M=C3=BCller?=" <joerg@example.de>\r\n'
    "To: Bob Example <bob@example.org>\r\n"
    "Message-ID: <alt.12345@mail.example.de>\r\n"
    "Subject: =?utf-8?b?w5xiZXIgZGFzIFRyZWZmZW4gbcO2Y2h0ZSBpY2g=?=\r\n"
    " =?utf-8?q?_noch_etwas_sagen?=\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="b1"\r\n'
    "\r\n"
    "--b1\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n" + _HALF + "\r\n"
    "--b1\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "\r\n"
    "<p>" + _HALF + "</p>\r\n"
    "--b1--\r\n"
).encode()


def per_message_us(raw: bytes, iterations: int = 2000) -> float:
    """Mean CPU microseconds for one ``build_email`` call on ``raw``."""
    for _ in range(50):  # warm caches (codec lookup, regex compilation)
        build_email(
            raw,
            envelope_recipients=("bob@example.org",),
            sent_by_user_id=None,
            max_attachment_size=1 << 20,
        )
    start = time.process_time()
    for _ in range(iterations):
        build_email(
            raw,
            envelope_recipients=("bob@example.org",),
            sent_by_user_id=uuid.UUID(int=1),
            max_attachment_size=1 << 20,
        )
    return (time.process_time() - start) / iterations * 1e6


def run() -> dict[str, float]:
    """µs of CPU per message for the typical and the encoded multipart/alternative case."""
    return {
        "typical_2k_us": per_message_us(TYPICAL),
        "rfc2047_alternative_2k_us": per_message_us(ENCODED_ALTERNATIVE),
    }


if __name__ == "__main__":
    print(f"sizes: typical {len(TYPICAL)} B, encoded alternative {len(ENCODED_ALTERNATIVE)} B")
    for name, value in run().items():
        print(f"{name}: {value:.1f} µs CPU per build_email")
