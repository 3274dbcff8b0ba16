"""Exceptions of the protocol core: raised only for misuse of the API, never for bad input."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of the core's exceptions."""


class LocalProtocolError(ProtocolError):
    """The application used the API wrongly; the connection is now in State.ERROR."""
