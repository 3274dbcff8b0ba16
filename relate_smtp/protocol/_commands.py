"""Pure parsers for command lines: verbs, RFC 5321 paths and typed ESMTP parameters.

Parsers return values or raise `_Reject` with the reply to send; they know nothing of
the session beyond the configuration and the flags passed in.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final

from . import _replies as replies
from ._config import ProtocolConfig
from ._events import BodyType, MailFrom, RcptTo
from ._replies import Reply, _Reject
from ._state import Command

VERBS: Final[dict[bytes, Command]] = {
    c.value.encode(): c
    for c in (
        Command.HELO,
        Command.EHLO,
        Command.AUTH,
        Command.STARTTLS,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
        Command.BDAT,
        Command.RSET,
        Command.NOOP,
        Command.VRFY,
        Command.HELP,
        Command.QUIT,
    )
}

# RFC 5321 §4.1.2, extended by RFC 6531 §3.3 with non-ASCII UTF-8 in atext, qtext and
# sub-domains. Written so no two alternatives overlap: matching stays linear.
_NON_ASCII = "\u0080-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_NON_ASCII}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"'
_LET_DIG = rf"[A-Za-z0-9{_NON_ASCII}]"
_SUB_DOMAIN = rf"{_LET_DIG}+(?:-+{_LET_DIG}+)*"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # checked further by _valid_literal
_PATH = re.compile(
    rf"<(?:(?P<route>@{_DOMAIN}(?:,@{_DOMAIN})*):)?"
    rf"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})@(?P<domain>{_DOMAIN}|{_ADDRESS_LITERAL})>"
)
_POSTMASTER = "<postmaster>"  # RFC 5321 §4.1.1.3: the one path without a domain


def split_command(line: bytes) -> tuple[Command | None, bytes]:
    """The verb (None if unknown; case-insensitive, RFC 5321 §2.4) and its arguments."""
    verb, _, args = line.partition(b" ")
    return VERBS.get(verb.upper()), args.strip(b" ")


def parse_hello(args: str, command: Command) -> str:
    """The EHLO/HELO domain; anything non-empty, the application judges it."""
    if not args or " " in args or not args.isprintable():
        raise _Reject(replies.SYNTAX_EHLO if command is Command.EHLO else replies.SYNTAX_HELO)
    return args


def _after_keyword(args: str, keyword: str, syntax: Reply) -> str:
    # "FROM:" / "TO:" case-insensitively; a space after the colon is tolerated as by
    # most servers, though RFC 5321 §4.1.2 has none.
    if args[: len(keyword)].upper() != keyword:
        raise _Reject(syntax)
    return args[len(keyword) :].lstrip(" ")


def _valid_literal(literal: str) -> bool:
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        address = inner[5:]
        if "%" in address:  # scope ids are not part of RFC 5321 §4.1.3
            return False
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _parse_path(text: str, bad: Reply) -> tuple[str, str, tuple[str, ...], str]:
    """A path at the start of ``text``: (local part, domain, source route, the rest)."""
    match = _PATH.match(text)
    if match is None:
        raise _Reject(bad)
    domain = match["domain"]
    if domain.startswith("[") and not _valid_literal(domain):
        raise _Reject(bad)
    route = match["route"]
    source_route = tuple(hop[1:] for hop in route.split(",")) if route else ()
    rest = text[match.end() :]
    return match["local"], domain, source_route, rest


def _split_params(rest: str, syntax: Reply) -> list[str]:
    if not rest:
        return []
    if not rest.startswith(" "):
        raise _Reject(syntax)
    return rest.split()


def _xtext(value: str) -> str:
    """Decode RFC 3461 §4 xtext (used by the AUTH= parameter, RFC 4954 §5)."""
    if "+" not in value:
        return value
    parts = value.split("+")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:2]
        if len(code) != 2 or not all(c in "0123456789ABCDEF" for c in code):
            raise _Reject(replies.BAD_PARAMETER)
        out.append(chr(int(code, 16)) + part[2:])
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _body_types(config: ProtocolConfig) -> dict[str, BodyType]:
    """BODY= values the config offers (cached: asked on every MAIL; the dict is only read)."""
    types = {}
    if config.eightbitmime or config.binarymime_offered:
        types["7BIT"] = BodyType.SEVEN_BIT
    if config.eightbitmime:
        types["8BITMIME"] = BodyType.EIGHT_BIT_MIME
    if config.binarymime_offered:
        types["BINARYMIME"] = BodyType.BINARY_MIME
    return types


def parse_mail(args: str, config: ProtocolConfig) -> MailFrom:
    """MAIL FROM:<reverse-path> [params] (RFC 5321 §4.1.1.2, RFC 1870, 6152, 6531, 4954)."""
    text = _after_keyword(args, "FROM:", replies.SYNTAX_MAIL)
    route: tuple[str, ...] = ()
    if text.startswith("<>"):
        local, domain, rest = "", "", text[2:]
    else:
        local, domain, route, rest = _parse_path(text, replies.BAD_SENDER_SYNTAX)
    size: int | None = None
    body: BodyType | None = None
    smtputf8 = False
    auth: str | None = None
    seen: set[str] = set()
    body_types = _body_types(config)
    for param in _split_params(rest, replies.SYNTAX_MAIL):
        keyword, has_value, value = param.partition("=")
        keyword = keyword.upper()
        if keyword in seen:
            raise _Reject(replies.DUPLICATE_PARAMETER)
        seen.add(keyword)
        if keyword == "SIZE":  # RFC 1870 §6: size-value ::= 1*20DIGIT
            if not (value.isascii() and value.isdigit() and len(value) <= 20):
                raise _Reject(replies.BAD_PARAMETER)
            size = int(value)
        elif keyword == "BODY" and body_types:
            body = body_types.get(value.upper())
            if body is None:
                raise _Reject(replies.BAD_PARAMETER)
        elif keyword == "SMTPUTF8" and config.smtputf8:
            if has_value:  # RFC 6531 §3.4: the parameter takes no value
                raise _Reject(replies.BAD_PARAMETER)
            smtputf8 = True
        elif keyword == "AUTH" and config.auth_enabled:
            if not value:
                raise _Reject(replies.BAD_PARAMETER)
            auth = _xtext(value)
        else:
            raise _Reject(replies.UNKNOWN_PARAMETER)
    address = f"{local}@{domain}" if local else ""
    if not smtputf8 and not address.isascii():
        raise _Reject(replies.UTF8_NEEDS_SMTPUTF8)
    if size is not None and config.max_message_size and size > config.max_message_size:
        raise _Reject(replies.MESSAGE_TOO_BIG)  # RFC 1870 §6.1
    return MailFrom(
        address=address,
        local_part=local,
        domain=domain,
        source_route=route,
        size=size,
        body=body,
        smtputf8=smtputf8,
        auth=auth,
    )


def parse_rcpt(args: str, *, smtputf8: bool) -> RcptTo:
    """RCPT TO:<forward-path> (RFC 5321 §4.1.1.3); no RCPT parameters are supported."""
    text = _after_keyword(args, "TO:", replies.SYNTAX_RCPT)
    route: tuple[str, ...] = ()
    if text[: len(_POSTMASTER)].lower() == _POSTMASTER:
        local, domain, rest = text[1 : len(_POSTMASTER) - 1], "", text[len(_POSTMASTER) :]
    elif text.startswith("<>"):
        raise _Reject(replies.NULL_RECIPIENT)
    else:
        local, domain, route, rest = _parse_path(text, replies.BAD_RECIPIENT_SYNTAX)
    if _split_params(rest, replies.SYNTAX_RCPT):
        raise _Reject(replies.UNKNOWN_PARAMETER)
    address = f"{local}@{domain}" if domain else local
    if not smtputf8 and not address.isascii():
        raise _Reject(replies.UTF8_NEEDS_SMTPUTF8)
    return RcptTo(address=address, local_part=local, domain=domain, source_route=route)


def parse_bdat(args: bytes) -> tuple[int, bool]:
    """BDAT chunk-size [LAST] (RFC 3030 §2): (size, last)."""
    size, _, rest = args.partition(b" ")
    rest = rest.strip(b" ")
    if not size.isdigit() or len(size) > 20 or rest.upper() not in (b"", b"LAST"):
        raise _Reject(replies.SYNTAX_BDAT)
    return int(size), bool(rest)


def parse_auth(args: str) -> tuple[str, str | None]:
    """AUTH mechanism [initial-response] (RFC 4954 §4): (mechanism, response or None)."""
    parts = args.split()
    if not parts or len(parts) > 2:
        raise _Reject(replies.SYNTAX_AUTH)
    return parts[0].upper(), parts[1] if len(parts) == 2 else None
