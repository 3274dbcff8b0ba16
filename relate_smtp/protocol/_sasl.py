"""AUTH PLAIN (RFC 4616) and AUTH LOGIN exchanges over SMTP (RFC 4954).

An exchange turns client responses into either the next 334 challenge or complete
credentials; the application only ever sees the credentials.
"""

from __future__ import annotations

import binascii
from typing import Final

import attrs

from . import _replies as replies
from ._replies import Reply, _Reject

_CANCEL: Final = b"*"  # RFC 4954 §4: the client gives up; the server answers 501
_EMPTY: Final = b"="  # RFC 4954 §4: an initial response that is empty


@attrs.frozen
class Credentials:
    """What the client proved it knows; the password is never shown in a repr."""

    mechanism: str
    authorization_id: str
    username: str
    password: str = attrs.field(repr=False)


def _decode(response: bytes) -> bytes:
    if response == _CANCEL:
        raise _Reject(replies.AUTH_CANCELLED)
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except binascii.Error:
        raise _Reject(replies.AUTH_UNDECODABLE) from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")  # RFC 4616 §2: UTF-8 strings
    except UnicodeDecodeError:
        raise _Reject(replies.AUTH_MALFORMED) from None


class _Plain:
    """PLAIN: one response, ``authzid NUL authcid NUL passwd`` (RFC 4616 §2)."""

    __slots__ = ()

    def start(self, initial: bytes | None) -> Reply | Credentials:
        if initial is None:
            return replies.EMPTY_CHALLENGE
        return self.respond(b"" if initial == _EMPTY else initial)

    def respond(self, response: bytes) -> Reply | Credentials:
        fields = _decode(response).split(b"\0")
        if len(fields) != 3 or not fields[1] or not fields[2]:
            raise _Reject(replies.AUTH_MALFORMED)
        authzid, authcid, passwd = (_text(f) for f in fields)
        return Credentials("PLAIN", authzid, authcid, passwd)


class _Login:
    """LOGIN: the username, then the password, each base64 after its own 334."""

    __slots__ = ("_username",)

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Reply | Credentials:
        if initial is None:
            return replies.LOGIN_USERNAME
        return self.respond(b"" if initial == _EMPTY else initial)

    def respond(self, response: bytes) -> Reply | Credentials:
        value = _text(_decode(response))
        if self._username is None:
            if not value:
                raise _Reject(replies.AUTH_MALFORMED)
            self._username = value
            return replies.LOGIN_PASSWORD
        return Credentials("LOGIN", "", self._username, value)


SaslExchange = _Plain | _Login

MECHANISMS: Final[dict[str, type[_Plain] | type[_Login]]] = {"PLAIN": _Plain, "LOGIN": _Login}


def start_exchange(mechanism: str) -> SaslExchange:
    """A fresh exchange for ``mechanism`` (upper case), or 504 if it is not offered."""
    factory = MECHANISMS.get(mechanism)
    if factory is None:
        raise _Reject(replies.UNKNOWN_MECHANISM)
    return factory()
