"""What one message may cost to parse: its MIME structure, and a worker's CPU and memory.

Plain records, so the configuration can hold them and the parser can check them without
either depending on the other. Each default is a setting (``Smtp:Mime:*``).
"""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class MimeLimits:
    """Bounds on a message's MIME structure, after Postfix's defaults."""

    #: Entities in the whole tree, the message itself included; real mail has tens.
    max_parts: int = 1000
    #: Multipart and message/* nesting; Postfix's ``mime_nesting_limit``.
    max_nesting_depth: int = 100
    #: One header field, name and folded value; Postfix's ``header_size_limit``.
    max_header_bytes: int = 102_400
    #: To/Cc/Bcc mailboxes stored as rows; the rest are dropped with one log line.
    max_header_recipients: int = 1000


@attrs.frozen(kw_only=True)
class ParseLimits:
    """What one parse in a worker process may cost, and how many run at once."""

    #: CPU seconds per message; a legitimate 50 MB message parses in a few.
    cpu_seconds: float = 20.0
    #: Address space of a worker process; a 50 MB message peaks well under half of it.
    memory_bytes: int = 1024 * 1024 * 1024
    #: Worker processes parsing at once (the machine's cores are shared with the loop).
    concurrency: int = 2
