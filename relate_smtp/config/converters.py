"""Typed value parsers: configuration text in, a typed value or a `ConfigError` out.

Each takes the canonical key (for the message) and the value, and reads it the way the
original's binder would, so a value written for the original means the same here. Every
message starts with the quoted value, so one line names the key, the value and what is
allowed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
from typing import Final
from urllib.parse import urlsplit

from relate_smtp.config.errors import ConfigError
from relate_smtp.config.timespan import TICKS_PER_SECOND, TimeSpanError, parse_timespan
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import BareLineEndings
from relate_smtp.sender_auth import Mode, NameServer

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII | re.IGNORECASE)


class LogLevel(enum.Enum):
    """ASP.NET's ``LogLevel`` in its order (``Logging:LogLevel:Default`` also takes 0-6)."""

    TRACE = "Trace"
    DEBUG = "Debug"
    INFORMATION = "Information"
    WARNING = "Warning"
    ERROR = "Error"
    CRITICAL = "Critical"
    NONE = "None"

    @property
    def logging_level(self) -> int:
        """The `logging` level; ``None`` is above every level, so nothing is logged."""
        return _LOGGING_LEVELS[self]


_LOGGING_LEVELS: Final = {
    LogLevel.TRACE: logging.DEBUG,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFORMATION: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
    LogLevel.NONE: logging.CRITICAL + 10,
}


# --- text -------------------------------------------------------------------------


def text(_key: str, value: str) -> str:
    return value


def secret(_key: str, value: str) -> str | None:
    """Secrets are kept exactly as given, spaces included; blank means not set."""
    return value if value.strip() else None


def connection_string(key: str, value: str) -> str:
    """Reject a connection string the PostgreSQL store could not use, at start-up.

    The parser's messages never echo the value: a connection string may hold a password.
    """
    if not value:
        return value
    from relate_smtp.storage.connstring import parse_connection_string

    try:
        parse_connection_string(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    return value


# --- booleans and numbers ----------------------------------------------------------


def boolean(key: str, value: str) -> bool:
    # bool.Parse: exactly true or false, any case.
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(key, f'"{value}" is not a boolean (true or false)')


def _integer(key: str, value: str, minimum: int, maximum: int | None, allowed: str) -> int:
    if _INTEGER.fullmatch(value):
        number = int(value)
        if number >= minimum and (maximum is None or number <= maximum):
            return number
    raise ConfigError(key, f'"{value}" is not {allowed}')


def port(key: str, value: str) -> int:
    return _integer(key, value, 0, 65535, "a port number (0-65535)")


def secure_port(key: str, value: str) -> int:
    """As the original: any int32 is taken, and 0 or less turns the listener off."""
    return _integer(key, value, -(2**31), 65535, "a port number (0-65535), or 0 or less for off")


def positive_int(key: str, value: str) -> int:
    return _integer(key, value, 1, None, "a positive whole number (1 or more)")


def int32(key: str, value: str) -> int:
    """Any value the original's ``int`` option binds."""
    return _integer(key, value, -(2**31), 2**31 - 1, "a whole number (32-bit)")


def count(key: str, value: str) -> int:
    return _integer(key, value, 0, None, "a whole number of 0 or more")


def ipv6_prefix_length(key: str, value: str) -> int:
    return _integer(key, value, 1, 128, "an IPv6 prefix length (1-128)")


def memory_bytes(key: str, value: str) -> int:
    # A worker process needs some 100 MiB before it parses anything.
    return _integer(key, value, 256 * 1024 * 1024, None, "a byte count of 268435456 or more")


def positive_number(key: str, value: str) -> float:
    if _NUMBER.fullmatch(value):
        number = float(value)
        if 0 < number < float("inf"):
            return number
    raise ConfigError(key, f'"{value}" is not a positive number (more than 0)')


def timespan(key: str, value: str) -> float:
    """A .NET TimeSpan as the original binds it (``TimeSpan.Parse``), in seconds."""
    try:
        ticks = parse_timespan(value)
    except TimeSpanError as exc:
        raise ConfigError(key, f'"{value}" {exc}') from None
    return ticks / TICKS_PER_SECOND


def positive_timespan(key: str, value: str) -> float:
    """The original fails every recorded AUTH failure on a window of zero or less
    (MemoryCache refuses the expiry), so such a value is refused at start."""
    seconds = timespan(key, value)
    if seconds <= 0:
        raise ConfigError(key, f'"{value}" is not a positive TimeSpan (more than 0, e.g. 00:15:00)')
    return seconds


# --- names from a fixed list ---------------------------------------------------------


def bare_line_endings(key: str, value: str) -> BareLineEndings:
    for mode in BareLineEndings:
        if value.lower() == mode.value:
            return mode
    names = ", ".join(mode.value for mode in BareLineEndings)
    raise ConfigError(key, f'"{value}" is not one of: {names}')


def listener_kind(key: str, value: str) -> ListenerKind:
    for kind in ListenerKind:
        if value.lower() == kind.value:
            return kind
    names = ", ".join(kind.value for kind in ListenerKind)
    raise ConfigError(key, f'"{value}" is not a listener name ({names})')


def sender_auth_mode(key: str, value: str) -> Mode:
    for mode in Mode:
        if value.lower() == mode.value:
            return mode
    names = ", ".join(mode.value for mode in Mode)
    raise ConfigError(key, f'"{value}" is not one of: {names}')


def log_level(key: str, value: str) -> LogLevel:
    for index, level in enumerate(LogLevel):
        if value.lower() == level.value.lower() or value == str(index):
            return level
    names = ", ".join(level.value for level in LogLevel)
    raise ConfigError(key, f'"{value}" is not a log level ({names})')


# --- networks, names and URLs ----------------------------------------------------------


def network(key: str, value: str) -> IPNetwork:
    try:
        # Host bits are allowed (10.1.2.3/8 means 10.0.0.0/8), as Postfix's mynetworks.
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(
            key, f'"{value}" is not an IP network (CIDR like 10.0.0.0/8, or one address)'
        ) from None


def name_server(key: str, value: str) -> NameServer:
    try:
        return NameServer.parse(value)
    except ValueError:
        raise ConfigError(
            key,
            f'"{value}" is not a DNS server address (192.0.2.53, 192.0.2.53:5353, '
            "2001:db8::53 or [2001:db8::53]:5353)",
        ) from None


def host_name(key: str, value: str) -> str:
    """A DNS name in ASCII (IDNA A-label) form, trailing dot removed, case kept."""
    name = value[:-1] if value.endswith(".") else value
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ConfigError(key, f'"{value}" is an IP address, not a domain name')
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if not (0 < len(ascii_name) <= 253 and all(_LABEL.fullmatch(x) for x in ascii_name.split("."))):
        raise ConfigError(
            key,
            f'"{value}" is not a domain name '
            "(dot-separated labels of letters, digits and inner hyphens)",
        )
    return ascii_name


def is_host_name(value: str) -> bool:
    """Whether ``value`` is a DNS name, so start-up can warn about a ServerName that is not."""
    try:
        host_name("", value)
    except ConfigError:
        return False
    return True


def server_name(key: str, value: str) -> str:
    """Any one word, as the original put any string in its greeting (a DNS name in
    A-label form); whitespace would split the name in the greeting and EHLO reply."""
    try:
        return host_name(key, value)
    except ConfigError:
        if value.isascii() and value.isprintable() and not _has_space(value):
            return value
        raise ConfigError(
            key, f'"{value}" is not a domain name (one word, like mail.example.com)'
        ) from None


def domain(key: str, value: str) -> str:
    """Domains compare case-insensitively, so they are kept lower-case."""
    return host_name(key, value).lower()


def domain_or_empty(key: str, value: str) -> str:
    """A domain, where an empty value means "none" rather than the default."""
    return domain(key, value.strip()) if value.strip() else ""


def http_url(key: str, value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(key, f'"{value}" has an invalid port (0-65535)') from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or _has_space(value):
        raise ConfigError(key, f'"{value}" is not an http:// or https:// URL')
    return value


def otlp_endpoint(key: str, value: str) -> str:
    """An OTLP collector URL (``http://`` or ``https://``); blank means none."""
    return http_url(key, value.strip()) if value.strip() else ""


def health_urls(key: str, value: str) -> str:
    """``HealthCheck:Url`` checked whole; `health_endpoints` says where it listens."""
    health_endpoints(key, value)
    return value


def health_endpoints(key: str, value: str) -> tuple[tuple[str, int], ...]:
    """Kestrel's ``UseUrls``: several URLs may be given, separated by ``;``."""
    urls = [url.strip() for url in value.split(";") if url.strip()]
    if not urls:
        raise ConfigError(key, "is empty; give a URL like http://localhost:8081")
    return tuple(_health_endpoint(key, url) for url in urls)


def _health_endpoint(key: str, value: str) -> tuple[str, int]:
    """Kestrel's rules: ``+``, ``*``, a wildcard address and any name but localhost bind
    every interface of both families (``::``); ``localhost`` binds both loopbacks."""
    parts = urlsplit(value)
    try:
        url_port = parts.port
    except ValueError:
        raise ConfigError(key, f'"{value}" has an invalid port (0-65535)') from None
    if parts.scheme.lower() != "http" or not parts.hostname or _has_space(value):
        raise ConfigError(
            key, f'"{value}" is not an http:// URL like http://localhost:8081 (no TLS here)'
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f'"{value}" must not have a path; /healthz is served at the root')
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            host = "::"
    else:
        host = "::" if address.is_unspecified else str(address)
    return host, 80 if url_port is None else url_port


def _has_space(value: str) -> bool:
    return any(char.isspace() for char in value)


# --- paths (relative to the working directory) -------------------------------------------


def readable_file(key: str, value: str, cwd: str) -> str:
    """Existence and readability only; the TLS module parses the contents."""
    path = os.path.join(cwd, value)
    if not os.path.isfile(path):
        problem = "is not a file" if os.path.exists(path) else "does not exist"
        raise ConfigError(key, f'"{value}" {problem}')
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f'"{value}" cannot be read: {exc.strerror or exc}') from None
    return path


def writable_directory(key: str, value: str, cwd: str) -> str:
    """An existing directory this process may create files in."""
    path = os.path.join(cwd, value)
    if not os.path.isdir(path):
        problem = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(key, f'"{value}" {problem}')
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, f'"{value}" is not writable')
    return path
