"""Settings: defaults → appsettings*.json → environment (``Smtp__Port``) → ``--Key:Path`` overrides.

The keys and defaults are the original C# host's (ASP.NET configuration layout) plus
the additions listed in SPEC §2. Every value is typed and validated here so that the
rest of the program never sees a raw string.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar
from urllib.parse import urlsplit

import attrs

from relate_smtp.handlers.limits import MimeLimits, ParseLimits
from relate_smtp.timespan import TICKS_PER_SECOND, TimeSpanError, parse_timespan

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(kw_only=True)
class MxSettings:
    enabled: bool = False
    port: int = 25
    hosted_domains: tuple[str, ...] = ()  # lower-case, no trailing dot
    validate_recipients: bool = True


@attrs.frozen(kw_only=True)
class MimeSettings:
    """``Smtp:Mime:*``: what parsing one message may cost (defaults in the limit records)."""

    limits: MimeLimits = MimeLimits()
    parse: ParseLimits = ParseLimits()


@attrs.frozen(kw_only=True)
class ProxyProtocolSettings:
    listeners: tuple[str, ...] = ()  # "submission" | "submission-tls" | "mx"
    trusted_networks: tuple[IPNetwork, ...] = ()


@attrs.frozen(kw_only=True)
class SmtpSettings:
    server_name: str = "localhost"
    port: int = 587
    secure_port: int = 465
    require_authentication: bool = True
    certificate_path: str | None = None
    certificate_password: str | None = None
    certificate_key_path: str | None = None
    max_attachment_size_bytes: int = 26_214_400
    max_message_size_bytes: int = 52_428_800
    allow_insecure_auth: bool = True
    bare_line_endings: str = "normalize"  # "normalize" | "reject"
    max_recipients: int = 100
    max_errors: int = 10
    # Refused recipients per session (since the last accepted message) before 421, as
    # Postfix's smtpd_hard_error_limit: apart from MaxErrors so that a mailing list with
    # a few stale addresses is not cut off while a directory harvest is.
    max_recipient_errors: int = 20
    command_timeout_seconds: float = 300.0
    data_timeout_seconds: float = 180.0
    min_data_rate_bytes_per_second: int = 500
    tls_handshake_timeout_seconds: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # Per-client limits count an IPv6 client by this prefix: a site gets a /64 (RFC 6177).
    client_ipv6_prefix_length: int = 64
    connection_limit_exempt_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    shutdown_timeout_seconds: float = 20.0
    restrict_sender_to_login: bool = False
    # A message beyond this goes to a spool file as it arrives (runtime/spool.py).
    spool_threshold_bytes: int = 1024 * 1024
    # Memory that parsing and storing large messages may hold at once (handlers/budget.py).
    max_buffered_bytes: int = 256 * 1024 * 1024
    mx: MxSettings = MxSettings()
    mime: MimeSettings = MimeSettings()
    proxy_protocol: ProxyProtocolSettings = ProxyProtocolSettings()


@attrs.frozen(kw_only=True)
class RateLimitSettings:
    """The original's ``AuthenticationRateLimitOptions``; the three delays are its
    TimeSpans, in seconds."""

    max_failed_attempts: int = 5
    lockout_window_seconds: float = 900.0
    base_backoff_delay_seconds: float = 1.0
    max_backoff_delay_seconds: float = 30.0


@attrs.frozen(kw_only=True)
class SecuritySettings:
    authentication_salt: str = ""
    rate_limit: RateLimitSettings = RateLimitSettings()


@attrs.frozen(kw_only=True)
class StorageSettings:
    sqlite_path: str = "relate-smtp.db"
    discard_messages: bool = False
    spool_path: str | None = None  # None: the system's temporary directory


@attrs.frozen(kw_only=True)
class ApiSettings:
    base_url: str = "http://localhost:5000"
    timeout_seconds: float = 10.0


@attrs.frozen(kw_only=True)
class HealthCheckSettings:
    url: str = "http://localhost:8081"
    dns_mx_domain: str = "gmail.com"
    # Derived from ``url`` when loading, one (host, port) per URL: host ``::`` is every
    # interface of both families, ``localhost`` both loopbacks, else one IP address.
    endpoints: tuple[tuple[str, int], ...] = (("localhost", 8081),)


@attrs.frozen(kw_only=True)
class Settings:
    smtp: SmtpSettings = SmtpSettings()
    default_connection: str = ""  # ConnectionStrings:DefaultConnection
    health_check: HealthCheckSettings = HealthCheckSettings()
    api: ApiSettings = ApiSettings()
    internal_api_key: str | None = None  # Internal:ApiKey
    security: SecuritySettings = SecuritySettings()
    storage: StorageSettings = StorageSettings()
    log_level: str = "Information"  # Logging:LogLevel:Default
    environment: str = "Production"


class ConfigError(Exception):
    """A configuration value is missing or invalid; ``key`` names it (``Smtp:Port``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# ---------------------------------------------------------------------------
# Loading: every source is flattened into one case-insensitive ``Section:Key``
# mapping (ASP.NET's model), which is then converted and validated in one place.
# ---------------------------------------------------------------------------

#: Every key the loader reads, in the canonical spelling that error messages use.
KNOWN_KEYS: Final[tuple[str, ...]] = (
    "Smtp:ServerName",
    "Smtp:Port",
    "Smtp:SecurePort",
    "Smtp:RequireAuthentication",
    "Smtp:CertificatePath",
    "Smtp:CertificatePassword",
    "Smtp:CertificateKeyPath",
    "Smtp:MaxAttachmentSizeBytes",
    "Smtp:MaxMessageSizeBytes",
    "Smtp:AllowInsecureAuth",
    "Smtp:BareLineEndings",
    "Smtp:MaxRecipients",
    "Smtp:MaxErrors",
    "Smtp:MaxRecipientErrors",
    "Smtp:CommandTimeoutSeconds",
    "Smtp:DataTimeoutSeconds",
    "Smtp:MinDataRateBytesPerSecond",
    "Smtp:TlsHandshakeTimeoutSeconds",
    "Smtp:MaxConnections",
    "Smtp:MaxConnectionsPerIp",
    "Smtp:ClientIpv6PrefixLength",
    "Smtp:ConnectionLimitExemptNetworks",
    "Smtp:ShutdownTimeoutSeconds",
    "Smtp:RestrictSenderToLogin",
    "Smtp:SpoolThresholdBytes",
    "Smtp:MaxBufferedBytes",
    "Smtp:Mx:Enabled",
    "Smtp:Mx:Port",
    "Smtp:Mx:HostedDomains",
    "Smtp:Mx:ValidateRecipients",
    "Smtp:Mime:MaxParts",
    "Smtp:Mime:MaxNestingDepth",
    "Smtp:Mime:MaxHeaderBytes",
    "Smtp:Mime:MaxHeaderRecipients",
    "Smtp:Mime:ParseCpuSeconds",
    "Smtp:Mime:ParseMemoryBytes",
    "Smtp:ProxyProtocol:Listeners",
    "Smtp:ProxyProtocol:TrustedNetworks",
    "ConnectionStrings:DefaultConnection",
    "HealthCheck:Url",
    "HealthCheck:DnsMxDomain",
    "Api:BaseUrl",
    "Api:TimeoutSeconds",
    "Internal:ApiKey",
    "Security:AuthenticationSalt",
    "Security:RateLimit:MaxFailedAttempts",
    "Security:RateLimit:LockoutWindow",
    "Security:RateLimit:BaseBackoffDelay",
    "Security:RateLimit:MaxBackoffDelay",
    "Storage:SqlitePath",
    "Storage:DiscardMessages",
    "Storage:SpoolPath",
    "Logging:LogLevel:Default",
)

#: ASP.NET's LogLevel names in enum order (ASP.NET also accepts their numbers 0-6).
LOG_LEVELS: Final = ("Trace", "Debug", "Information", "Warning", "Error", "Critical", "None")
PROXY_LISTENERS: Final = ("submission", "submission-tls", "mx")
BARE_LINE_ENDINGS: Final = ("normalize", "reject")

# Environment variables outside these sections (PATH, HOME, ...) are never looked at.
_SECTIONS: Final = frozenset(key.split(":", 1)[0].lower() for key in KNOWN_KEYS)

# ASP.NET maps these Azure App Service variables to ``ConnectionStrings:<name>``;
# POSTGRESQLCONNSTR_ is what Azure sets for a PostgreSQL connection string.
_CONNECTION_STRING_PREFIXES: Final = (
    "CUSTOMCONNSTR_",
    "POSTGRESQLCONNSTR_",
    "MYSQLCONNSTR_",
    "SQLAZURECONNSTR_",
    "SQLCONNSTR_",
)

# An override key has at least two segments (``Smtp:Port``), so the CLI's own flags
# (``--config``, ``--name``) and e-mail addresses never look like one.
_OVERRIDE_KEY: Final = re.compile(r"[A-Za-z_][\w.-]*(?::[\w.-]+)+", re.ASCII)

_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII | re.IGNORECASE)

# JSON extras that ASP.NET's reader skips. Strings are matched first so that "//" or
# "," inside a value is left alone.
_JSON_COMMENT: Final = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?\*/', re.DOTALL)
_JSON_TRAILING_COMMA: Final = re.compile(r'"(?:[^"\\]|\\.)*"|,(?=\s*[}\]])')

_Raw = dict[str, str | None]
_T = TypeVar("_T")


def load_settings(
    *,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Settings:
    """Read every configuration source in ASP.NET's order and return typed settings.

    Later sources win: defaults, ``appsettings.json`` (``config_file``, else the one in
    ``cwd`` if present), ``appsettings.{Environment}.json`` in the same directory,
    environment variables (``Smtp__Port``), then ``overrides`` (``--Smtp:Port=2587``).
    Raises `ConfigError` naming the key for a missing file or any invalid value.
    """
    env = os.environ if environ is None else environ
    base_dir = os.getcwd() if cwd is None else cwd
    cli = _from_overrides(overrides)
    environment = _environment_name(env, cli)

    if config_file is None:
        path = os.path.join(base_dir, "appsettings.json")
    else:
        path = os.path.join(base_dir, config_file)
        if not os.path.isfile(path):
            raise ConfigError("--config", f'"{config_file}" does not exist or is not a file')
    environment_path = os.path.join(os.path.dirname(path), f"appsettings.{environment}.json")

    raw: _Raw = {}
    for candidate in (path, environment_path):
        if os.path.isfile(candidate):
            raw.update(_read_json_file(candidate))
    raw.update(_from_environ(env))
    raw.update(cli)
    values = _Values(raw)
    settings = _convert(values, environment=environment, cwd=base_dir)
    if _explicitly_production(env, cli):
        _require_database(settings, values)
    return settings


def is_override(arg: str) -> bool:
    """Tell whether an argv token is a configuration override rather than a CLI flag.

    True for ``--Smtp:Port=1``, ``/Smtp:Port=1``, ``Smtp:Port=1``, ``--Smtp:Port`` (whose
    value is the next token) and ``--environment``; false for ``--config`` and the like.
    """
    if arg.startswith("--"):
        name = arg[2:].partition("=")[0]
    elif arg.startswith("/"):
        name = arg[1:].partition("=")[0]
    elif "=" in arg:
        name = arg.partition("=")[0]
    else:
        return False
    return _OVERRIDE_KEY.fullmatch(name) is not None or name.lower() == "environment"


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into (overrides, other arguments), each in its original order.

    An override without ``=`` takes the next token as its value, as ASP.NET does, so
    ``--Smtp:Port 2587`` stays together.
    """
    overrides: list[str] = []
    rest: list[str] = []
    tokens = iter(argv)
    for arg in tokens:
        if not is_override(arg):
            rest.append(arg)
            continue
        overrides.append(arg)
        if "=" not in arg:
            value = next(tokens, None)
            if value is not None:
                overrides.append(value)
    return overrides, rest


# --- sources ---------------------------------------------------------------


_ENVIRONMENT_VARIABLES: Final = ("DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT")


def _environment_name(environ: Mapping[str, str], cli: _Raw) -> str:
    """The generic host's rule: ``--environment``, then the DOTNET_/ASPNETCORE_ variables."""
    for value in (cli.get("environment"), *(environ.get(k) for k in _ENVIRONMENT_VARIABLES)):
        if value and value.strip():
            return value.strip()
    return "Production"


def _explicitly_production(environ: Mapping[str, str], cli: _Raw) -> bool:
    """Production named by a source rather than assumed (``IsProduction`` ignores case):
    a container image sets it, a developer's ``relate-smtp serve`` does not."""
    named = [cli.get("environment"), *(environ.get(k) for k in _ENVIRONMENT_VARIABLES)]
    first = next((value.strip() for value in named if value and value.strip()), None)
    return first is not None and first.lower() == "production"


def _require_database(settings: Settings, values: _Values) -> None:
    """The original refuses to start in Production without a connection string (SPEC §2);
    an explicit Storage:SqlitePath says the file is meant to persist (a mounted volume)."""
    if settings.default_connection or values.value("Storage:SqlitePath") is not None:
        return
    raise ConfigError(
        "ConnectionStrings:DefaultConnection",
        "ConnectionStrings:DefaultConnection is required. Set via environment variable "
        "ConnectionStrings__DefaultConnection (the environment is Production; set "
        "Storage:SqlitePath to keep mail in an SQLite file on a persistent volume instead).",
    )


def _read_json_file(path: str) -> _Raw:
    """Flatten an appsettings file; comments and trailing commas are allowed as in ASP.NET."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except UnicodeDecodeError:
        raise ConfigError(path, "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        # Numbers stay as their source text, as in ASP.NET: "1.0" is then not an int.
        document = json.loads(
            _strip_json_extras(text),
            parse_int=str,
            parse_float=str,
            parse_constant=str,
            object_pairs_hook=_JsonObject,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(document, _JsonObject):
        raise ConfigError(path, "must hold a JSON object ({...}) at the top level")
    raw: _Raw = {}
    _flatten(document, "", raw, path)
    return raw


class _JsonObject(list[tuple[str, object]]):
    """A JSON object as its list of pairs, so duplicate keys are seen, not merged."""


def _strip_json_extras(text: str) -> str:
    """Blank out comments and trailing commas, keeping every line and column in place."""

    def blank(match: re.Match[str]) -> str:
        found = match.group()
        return found if found.startswith('"') else re.sub(r"[^\n]", " ", found)

    return _JSON_TRAILING_COMMA.sub(blank, _JSON_COMMENT.sub(blank, text))


def _flatten(node: object, prefix: str, out: _Raw, source: str) -> None:
    """Store ``node`` under ``prefix``: objects by member name, arrays by index."""
    children: list[tuple[str, object]]
    if isinstance(node, _JsonObject):
        children = list(node)
    elif isinstance(node, list):
        children = [(str(index), item) for index, item in enumerate(node)]
    else:
        _put(out, prefix, _json_scalar(node), source)
        return
    if not children:
        # ASP.NET keeps an empty object or array as a null value: "set, but empty".
        _put(out, prefix, None, source)
        return
    for name, child in children:
        _flatten(child, f"{prefix}:{name}" if prefix else name, out, source)


def _put(out: _Raw, key: str, value: str | None, source: str) -> None:
    if key.lower() in out:
        raise ConfigError(source, f'duplicate key "{key}" (keys are case-insensitive)')
    out[key.lower()] = value


def _json_scalar(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # strings, and numbers kept as their text


def _from_environ(environ: Mapping[str, str]) -> _Raw:
    """``Smtp__Mx__Port`` (or ``Smtp:Mx:Port``) → ``smtp:mx:port``, known sections only."""
    raw: _Raw = {}
    for name, value in environ.items():
        key = name
        for prefix in _CONNECTION_STRING_PREFIXES:
            if name.upper().startswith(prefix):
                key = "ConnectionStrings:" + name[len(prefix) :]
                break
        key = key.replace("__", ":").lower()
        section, colon, _ = key.partition(":")
        if colon and section in _SECTIONS:
            raw[key] = value
    return raw


def _from_overrides(args: Sequence[str]) -> _Raw:
    """Parse overrides with ASP.NET's command-line rules, but fail loudly on bad tokens."""
    raw: _Raw = {}
    tokens = iter(args)
    for arg in tokens:
        if arg.startswith("--"):
            body = arg[2:]
        elif arg.startswith("/"):
            body = arg[1:]
        elif arg.startswith("-"):
            raise ConfigError(arg, "is not a configuration override; write --Section:Key=value")
        elif "=" in arg:
            body = arg
        else:
            raise ConfigError(arg, "is not a configuration override; write --Section:Key=value")
        key, equals, value = body.partition("=")
        if not key:
            raise ConfigError(arg, "has no key; write --Section:Key=value")
        if not equals:
            following = next(tokens, None)
            if following is None:
                raise ConfigError(key, f"{arg} has no value; write {arg}=value or {arg} value")
            value = following
        raw[key.lower()] = value
    return raw


# --- conversion --------------------------------------------------------------


class _Values:
    """The merged sources, looked up case-insensitively by canonical key."""

    def __init__(self, raw: _Raw) -> None:
        self._raw = raw

    def get(self, key: str) -> str | None:
        """The raw value; None when no source sets it or the last one set JSON null."""
        return self._raw.get(key.lower())

    def value(self, key: str) -> str | None:
        """The value stripped of spaces; None when unset or blank, so the default applies."""
        value = self.get(key)
        if value is None or not value.strip():
            return None
        return value.strip()

    def items(self, key: str) -> list[str] | None:
        """Array elements in index order; None when no source mentions the array.

        Blank elements are dropped, so a later source can remove an index by emptying it.
        A plain value instead of indexes is read as a comma-separated list.
        """
        prefix = key.lower() + ":"
        indexed: list[tuple[int, str]] = []
        has_children = False
        for name, value in self._raw.items():
            if not name.startswith(prefix):
                continue
            has_children = True
            index, nested, _ = name[len(prefix) :].partition(":")
            if not index.isascii() or not index.isdigit():
                raise ConfigError(key, f'"{index}" is not an array index; use {key}:0, {key}:1')
            if nested:
                raise ConfigError(f"{key}:{index}", "must be a string, not an object")
            if value is not None and value.strip():
                indexed.append((int(index), value.strip()))
        if has_children:
            return [value for _, value in sorted(indexed, key=lambda pair: pair[0])]
        if key.lower() not in self._raw:
            return None
        return [part.strip() for part in (self.get(key) or "").split(",") if part.strip()]


def _typed(values: _Values, key: str, convert: Callable[[str, str], _T], default: _T) -> _T:
    value = values.value(key)
    return default if value is None else convert(key, value)


def _typed_list(
    values: _Values, key: str, convert: Callable[[str, str], _T], default: tuple[_T, ...]
) -> tuple[_T, ...]:
    items = values.items(key)
    if items is None:
        return default
    converted = [convert(key, item) for item in items]
    return tuple(dict.fromkeys(converted))  # drop repeats, keep order


def _text(_key: str, value: str) -> str:
    return value


def _boolean(key: str, value: str) -> bool:
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


def _port(key: str, value: str) -> int:
    return _integer(key, value, 0, 65535, "a port number (0-65535)")


def _secure_port(key: str, value: str) -> int:
    """As the original: any int32 is taken, and 0 or less turns the listener off."""
    return _integer(key, value, -(2**31), 65535, "a port number (0-65535), or 0 or less for off")


def _positive_int(key: str, value: str) -> int:
    return _integer(key, value, 1, None, "a positive whole number (1 or more)")


def _int32(key: str, value: str) -> int:
    """Any value the original's ``int`` option binds."""
    return _integer(key, value, -(2**31), 2**31 - 1, "a whole number (32-bit)")


def _timespan(key: str, value: str) -> float:
    """A .NET TimeSpan as the original binds it (``TimeSpan.Parse``), in seconds."""
    try:
        ticks = parse_timespan(value)
    except TimeSpanError as exc:
        raise ConfigError(key, f'"{value}" {exc}') from None
    return ticks / TICKS_PER_SECOND


def _positive_timespan(key: str, value: str) -> float:
    """The original fails every recorded AUTH failure on a window of zero or less
    (MemoryCache refuses the expiry), so such a value is refused at start."""
    seconds = _timespan(key, value)
    if seconds <= 0:
        raise ConfigError(key, f'"{value}" is not a positive TimeSpan (more than 0, e.g. 00:15:00)')
    return seconds


def _count(key: str, value: str) -> int:
    return _integer(key, value, 0, None, "a whole number of 0 or more")


def _ipv6_prefix_length(key: str, value: str) -> int:
    return _integer(key, value, 1, 128, "an IPv6 prefix length (1-128)")


def _number(key: str, value: str, allow_zero: bool) -> float:
    if _NUMBER.fullmatch(value):
        number = float(value)
        if number < float("inf") and (number > 0 or (allow_zero and number == 0)):
            return number
    allowed = "a number of 0 or more" if allow_zero else "a positive number (more than 0)"
    raise ConfigError(key, f'"{value}" is not {allowed}')


def _positive_number(key: str, value: str) -> float:
    return _number(key, value, allow_zero=False)


def _bare_line_endings(key: str, value: str) -> str:
    if value.lower() in BARE_LINE_ENDINGS:
        return value.lower()
    raise ConfigError(key, f'"{value}" is not one of: {", ".join(BARE_LINE_ENDINGS)}')


def _proxy_listener(key: str, value: str) -> str:
    if value.lower() in PROXY_LISTENERS:
        return value.lower()
    raise ConfigError(key, f'"{value}" is not a listener name ({", ".join(PROXY_LISTENERS)})')


def _log_level(key: str, value: str) -> str:
    for index, name in enumerate(LOG_LEVELS):
        if value.lower() == name.lower() or value == str(index):
            return name
    raise ConfigError(key, f'"{value}" is not a log level ({", ".join(LOG_LEVELS)})')


def _network(key: str, value: str) -> IPNetwork:
    try:
        # Host bits are allowed (10.1.2.3/8 means 10.0.0.0/8), as Postfix's mynetworks.
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(
            key, f'"{value}" is not an IP network (CIDR like 10.0.0.0/8, or one address)'
        ) from None


def _host_name(key: str, value: str) -> str:
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


def _server_name(key: str, value: str) -> str:
    """Any one word, as the original put any string in its greeting (a DNS name in
    A-label form); whitespace would split the name in the greeting and EHLO reply."""
    try:
        return _host_name(key, value)
    except ConfigError:
        if value.isascii() and value.isprintable() and not _has_space(value):
            return value
        raise ConfigError(
            key, f'"{value}" is not a domain name (one word, like mail.example.com)'
        ) from None


def is_host_name(value: str) -> bool:
    """Whether ``value`` is a DNS name, so start-up can warn about a ServerName that is not."""
    try:
        _host_name("", value)
    except ConfigError:
        return False
    return True


def _domain(key: str, value: str) -> str:
    """Domains compare case-insensitively, so they are kept lower-case."""
    return _host_name(key, value).lower()


def _http_url(key: str, value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(key, f'"{value}" has an invalid port (0-65535)') from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or _has_space(value):
        raise ConfigError(key, f'"{value}" is not an http:// or https:// URL')
    return value


def _has_space(value: str) -> bool:
    return any(char.isspace() for char in value)


def _health_urls(key: str, value: str) -> tuple[tuple[str, int], ...]:
    """Kestrel's ``UseUrls``: several URLs may be given, separated by ``;``."""
    urls = [url.strip() for url in value.split(";") if url.strip()]
    if not urls:
        raise ConfigError(key, "is empty; give a URL like http://localhost:8081")
    return tuple(_health_url(key, url) for url in urls)


def _health_url(key: str, value: str) -> tuple[str, int]:
    """Kestrel's rules: ``+``, ``*``, a wildcard address and any name but localhost bind
    every interface of both families (``::``); ``localhost`` binds both loopbacks."""
    parts = urlsplit(value)
    try:
        port = parts.port
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
    return host, 80 if port is None else port


def _spool_directory(values: _Values, cwd: str) -> str | None:
    """``Storage:SpoolPath``: an existing, writable directory (relative to ``cwd``)."""
    key = "Storage:SpoolPath"
    value = values.value(key)
    if value is None or not value.strip():
        return None
    path = os.path.join(cwd, value.strip())
    if not os.path.isdir(path):
        problem = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(key, f'"{value}" {problem}')
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, f'"{value}" is not writable')
    return path


def _readable_file(key: str, value: str, cwd: str) -> str:
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


def _validate_connection_string(key: str, value: str) -> str:
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


def _mime_settings(values: _Values) -> MimeSettings:
    d_limits, d_parse = MimeLimits(), ParseLimits()
    return MimeSettings(
        limits=MimeLimits(
            max_parts=_typed(values, "Smtp:Mime:MaxParts", _positive_int, d_limits.max_parts),
            max_nesting_depth=_typed(
                values, "Smtp:Mime:MaxNestingDepth", _positive_int, d_limits.max_nesting_depth
            ),
            max_header_bytes=_typed(
                values, "Smtp:Mime:MaxHeaderBytes", _positive_int, d_limits.max_header_bytes
            ),
            max_header_recipients=_typed(
                values,
                "Smtp:Mime:MaxHeaderRecipients",
                _positive_int,
                d_limits.max_header_recipients,
            ),
        ),
        parse=ParseLimits(
            cpu_seconds=_typed(
                values, "Smtp:Mime:ParseCpuSeconds", _positive_number, d_parse.cpu_seconds
            ),
            memory_bytes=_typed(
                values, "Smtp:Mime:ParseMemoryBytes", _memory_bytes, d_parse.memory_bytes
            ),
        ),
    )


def _memory_bytes(key: str, value: str) -> int:
    # A worker process needs some 100 MiB before it parses anything.
    return _integer(key, value, 256 * 1024 * 1024, None, "a byte count of 268435456 or more")


def _convert(values: _Values, *, environment: str, cwd: str) -> Settings:
    """Build the typed settings; defaults come from the attrs classes above."""
    d_smtp, d_mx, d_health = SmtpSettings(), MxSettings(), HealthCheckSettings()
    d_api, d_rate, d_storage = ApiSettings(), RateLimitSettings(), StorageSettings()

    mx = MxSettings(
        enabled=_typed(values, "Smtp:Mx:Enabled", _boolean, d_mx.enabled),
        port=_typed(values, "Smtp:Mx:Port", _port, d_mx.port),
        hosted_domains=_typed_list(values, "Smtp:Mx:HostedDomains", _domain, d_mx.hosted_domains),
        validate_recipients=_typed(
            values, "Smtp:Mx:ValidateRecipients", _boolean, d_mx.validate_recipients
        ),
    )
    if mx.enabled and not mx.hosted_domains:
        raise ConfigError(
            "Smtp:Mx:HostedDomains",
            "is empty but Smtp:Mx:Enabled is true; an MX listener without hosted domains "
            "would be an open relay. List them, e.g. Smtp__Mx__HostedDomains__0=example.com",
        )

    mime = _mime_settings(values)
    proxy = ProxyProtocolSettings(
        listeners=_typed_list(values, "Smtp:ProxyProtocol:Listeners", _proxy_listener, ()),
        trusted_networks=_typed_list(values, "Smtp:ProxyProtocol:TrustedNetworks", _network, ()),
    )
    if proxy.listeners and not proxy.trusted_networks:
        raise ConfigError(
            "Smtp:ProxyProtocol:TrustedNetworks",
            "is empty but Smtp:ProxyProtocol:Listeners is not; list the load balancers "
            "allowed to send PROXY headers, e.g. 10.0.0.0/8",
        )

    certificate = values.value("Smtp:CertificatePath")
    certificate_key = values.value("Smtp:CertificateKeyPath")
    if certificate_key is not None and certificate is None:
        raise ConfigError(
            "Smtp:CertificateKeyPath", "is set but Smtp:CertificatePath is not; set both"
        )

    smtp = SmtpSettings(
        server_name=_typed(values, "Smtp:ServerName", _server_name, d_smtp.server_name),
        port=_typed(values, "Smtp:Port", _port, d_smtp.port),
        secure_port=_typed(values, "Smtp:SecurePort", _secure_port, d_smtp.secure_port),
        require_authentication=_typed(
            values, "Smtp:RequireAuthentication", _boolean, d_smtp.require_authentication
        ),
        certificate_path=(
            None
            if certificate is None
            else _readable_file("Smtp:CertificatePath", certificate, cwd)
        ),
        certificate_password=_nonblank(values, "Smtp:CertificatePassword"),
        certificate_key_path=(
            None
            if certificate_key is None
            else _readable_file("Smtp:CertificateKeyPath", certificate_key, cwd)
        ),
        max_attachment_size_bytes=_typed(
            values, "Smtp:MaxAttachmentSizeBytes", _positive_int, d_smtp.max_attachment_size_bytes
        ),
        max_message_size_bytes=_typed(
            values, "Smtp:MaxMessageSizeBytes", _positive_int, d_smtp.max_message_size_bytes
        ),
        allow_insecure_auth=_typed(
            values, "Smtp:AllowInsecureAuth", _boolean, d_smtp.allow_insecure_auth
        ),
        bare_line_endings=_typed(
            values, "Smtp:BareLineEndings", _bare_line_endings, d_smtp.bare_line_endings
        ),
        max_recipients=_typed(values, "Smtp:MaxRecipients", _positive_int, d_smtp.max_recipients),
        max_errors=_typed(values, "Smtp:MaxErrors", _positive_int, d_smtp.max_errors),
        max_recipient_errors=_typed(
            values, "Smtp:MaxRecipientErrors", _positive_int, d_smtp.max_recipient_errors
        ),
        command_timeout_seconds=_typed(
            values, "Smtp:CommandTimeoutSeconds", _positive_number, d_smtp.command_timeout_seconds
        ),
        data_timeout_seconds=_typed(
            values, "Smtp:DataTimeoutSeconds", _positive_number, d_smtp.data_timeout_seconds
        ),
        min_data_rate_bytes_per_second=_typed(
            values,
            "Smtp:MinDataRateBytesPerSecond",
            _count,
            d_smtp.min_data_rate_bytes_per_second,
        ),
        tls_handshake_timeout_seconds=_typed(
            values,
            "Smtp:TlsHandshakeTimeoutSeconds",
            _positive_number,
            d_smtp.tls_handshake_timeout_seconds,
        ),
        max_connections=_typed(
            values, "Smtp:MaxConnections", _positive_int, d_smtp.max_connections
        ),
        max_connections_per_ip=_typed(
            values, "Smtp:MaxConnectionsPerIp", _count, d_smtp.max_connections_per_ip
        ),
        client_ipv6_prefix_length=_typed(
            values,
            "Smtp:ClientIpv6PrefixLength",
            _ipv6_prefix_length,
            d_smtp.client_ipv6_prefix_length,
        ),
        connection_limit_exempt_networks=_typed_list(
            values,
            "Smtp:ConnectionLimitExemptNetworks",
            _network,
            d_smtp.connection_limit_exempt_networks,
        ),
        shutdown_timeout_seconds=_typed(
            values, "Smtp:ShutdownTimeoutSeconds", _positive_number, d_smtp.shutdown_timeout_seconds
        ),
        restrict_sender_to_login=_typed(
            values, "Smtp:RestrictSenderToLogin", _boolean, d_smtp.restrict_sender_to_login
        ),
        spool_threshold_bytes=_typed(
            values, "Smtp:SpoolThresholdBytes", _positive_int, d_smtp.spool_threshold_bytes
        ),
        max_buffered_bytes=_typed(
            values, "Smtp:MaxBufferedBytes", _positive_int, d_smtp.max_buffered_bytes
        ),
        mx=mx,
        mime=mime,
        proxy_protocol=proxy,
    )
    _check_port_clashes(smtp)

    health_url = _typed(values, "HealthCheck:Url", _text, d_health.url)
    health_endpoints = _health_urls("HealthCheck:Url", health_url)
    dns_mx_domain = values.get("HealthCheck:DnsMxDomain")
    if dns_mx_domain is None:
        dns_mx_domain = d_health.dns_mx_domain
    elif dns_mx_domain.strip():  # empty disables the dns-mx check (SPEC §2)
        dns_mx_domain = _domain("HealthCheck:DnsMxDomain", dns_mx_domain.strip())
    else:
        dns_mx_domain = ""

    connection = values.get("ConnectionStrings:DefaultConnection") or ""
    return Settings(
        smtp=smtp,
        default_connection=_validate_connection_string(
            "ConnectionStrings:DefaultConnection", connection
        ),
        health_check=HealthCheckSettings(
            url=health_url, dns_mx_domain=dns_mx_domain, endpoints=health_endpoints
        ),
        api=ApiSettings(
            base_url=_typed(values, "Api:BaseUrl", _http_url, d_api.base_url),
            timeout_seconds=_typed(
                values, "Api:TimeoutSeconds", _positive_number, d_api.timeout_seconds
            ),
        ),
        internal_api_key=_nonblank(values, "Internal:ApiKey"),
        security=SecuritySettings(
            authentication_salt=values.get("Security:AuthenticationSalt") or "",
            rate_limit=RateLimitSettings(
                max_failed_attempts=_typed(
                    values,
                    "Security:RateLimit:MaxFailedAttempts",
                    _int32,
                    d_rate.max_failed_attempts,
                ),
                lockout_window_seconds=_typed(
                    values,
                    "Security:RateLimit:LockoutWindow",
                    _positive_timespan,
                    d_rate.lockout_window_seconds,
                ),
                base_backoff_delay_seconds=_typed(
                    values,
                    "Security:RateLimit:BaseBackoffDelay",
                    _timespan,
                    d_rate.base_backoff_delay_seconds,
                ),
                max_backoff_delay_seconds=_typed(
                    values,
                    "Security:RateLimit:MaxBackoffDelay",
                    _timespan,
                    d_rate.max_backoff_delay_seconds,
                ),
            ),
        ),
        storage=StorageSettings(
            sqlite_path=_typed(values, "Storage:SqlitePath", _text, d_storage.sqlite_path),
            discard_messages=_typed(
                values, "Storage:DiscardMessages", _boolean, d_storage.discard_messages
            ),
            spool_path=_spool_directory(values, cwd),
        ),
        log_level=_typed(values, "Logging:LogLevel:Default", _log_level, "Information"),
        environment=environment,
    )


def _nonblank(values: _Values, key: str) -> str | None:
    """Secrets are kept exactly as given; blank means not set."""
    value = values.get(key)
    return value if value is not None and value.strip() else None


def _check_port_clashes(smtp: SmtpSettings) -> None:
    """Two listeners on one fixed port would fail at bind time with a vaguer error."""
    listeners = [("Smtp:Port", smtp.port), ("Smtp:SecurePort", smtp.secure_port)]
    if smtp.mx.enabled:
        listeners.append(("Smtp:Mx:Port", smtp.mx.port))
    used: dict[int, str] = {}
    for key, port in listeners:
        if port <= 0:  # a free port (Port, Mx:Port) or disabled (SecurePort)
            continue
        if port in used:
            raise ConfigError(key, f"{port} is already the port of {used[port]}")
        used[port] = key
