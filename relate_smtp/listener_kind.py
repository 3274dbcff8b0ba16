"""The three SMTP endpoints of SPEC §1, in a leaf module every layer may import."""

from __future__ import annotations

import enum

__all__ = ["ListenerKind"]


class ListenerKind(enum.Enum):
    """The three SMTP endpoints of SPEC §1; the value is the listener's public name."""

    SUBMISSION = "submission"
    SUBMISSION_TLS = "submission-tls"
    MX = "mx"
