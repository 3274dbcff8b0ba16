"""``ConnectionStrings:DefaultConnection`` → the parameters the PostgreSQL store connects with.

The original host hands this string to Npgsql, so operators already have strings in
Npgsql's key/value form (``Host=db;Database=relate;Username=relate;Password=…``); newer
deployments (and most PaaS add-ons) hand out ``postgresql://`` URLs. Both are accepted
(SPEC §2).

Npgsql rejects keys it does not know, and so do we: a typo such as ``Databse=`` must stop
start-up rather than silently connect somewhere else. Every keyword Npgsql 10 knows is
accepted (SPEC §8), so a string copied from the original keeps working: those asyncpg
can honour are applied (several hosts, TLS files, target session attributes, options,
keepalives, …); the rest only tune Npgsql itself and are listed in
:attr:`PostgresParams.ignored` for one start-up warning that names them.

Error messages name the key and the problem but never echo the string or a value that
might be the password.
"""

from __future__ import annotations

import shlex
import urllib.parse
from typing import Any, Final

import attrs

from relate_smtp.storage.npgsql_keywords import (
    IGNORED,
    SESSION_ATTRS,
    SSL_MODES,
    SUPPORTED,
    SslMode,
)

__all__ = [
    "DEFAULT_MAX_POOL_SIZE",
    "PostgresParams",
    "connect_arguments",
    "parse_connection_string",
    "redacted",
]

# Npgsql's default (SPEC §8): a connection string copied from the original sizes the
# pool the same. Connections open on demand, so an idle host holds none.
DEFAULT_MAX_POOL_SIZE: Final = 100
DEFAULT_MIN_POOL_SIZE: Final = 0  # Npgsql's default: no connection is opened before use
DEFAULT_CONNECT_TIMEOUT: Final = 15.0  # Npgsql "Timeout" default, seconds
DEFAULT_COMMAND_TIMEOUT: Final = 30.0  # Npgsql "Command Timeout" default, seconds
DEFAULT_PORT: Final = 5432
DEFAULT_IDLE_LIFETIME: Final = 300.0  # Npgsql "Connection Idle Lifetime" default, seconds
MAX_POOL_SIZE_LIMIT: Final = 1024  # Npgsql's upper bound for Maximum Pool Size


@attrs.frozen(kw_only=True)
class PostgresParams:
    """Where and how to connect; ``None`` lets asyncpg apply libpq's defaults
    (``PGUSER``, ``PGPASSWORD``, ``~/.pgpass``, ``PGSSLMODE``…)."""

    host: str | None = None
    port: int = DEFAULT_PORT
    database: str | None = None
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ssl: SslMode | None = None
    min_pool_size: int = DEFAULT_MIN_POOL_SIZE
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT
    application_name: str | None = "relate-smtp"
    search_path: str | None = None
    # Hosts after the first, each with its port, tried in order (Npgsql's failover).
    other_hosts: tuple[tuple[str, int], ...] = ()
    load_balance_hosts: bool = False
    target_session_attrs: str | None = None
    passfile: str | None = None
    ssl_root_certificate: str | None = None
    ssl_certificate: str | None = None
    ssl_key: str | None = None
    ssl_password: str | None = attrs.field(default=None, repr=False)
    ssl_direct: bool = False
    kerberos_service_name: str | None = None
    timezone: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # run-time parameters from Options
    idle_lifetime: float = DEFAULT_IDLE_LIFETIME
    pooling: bool = True
    tcp_keepalive: bool = False
    keepalive_idle: int | None = None  # seconds idle before the first TCP probe
    keepalive_interval: int | None = None  # seconds between probes
    ignored: tuple[str, ...] = ()  # keywords as written that have no effect here


# --- Npgsql key/value form -------------------------------------------------------------


def _normalise_key(key: str) -> str:
    return "".join(key.split()).lower()


def _split_pairs(text: str) -> list[tuple[str, str]]:
    """Split ``k=v;k="v;v";…`` the way ADO.NET's DbConnectionStringBuilder does.

    Values may be quoted with ``"`` or ``'``; a doubled quote inside stands for one quote.
    ``==`` in a key stands for a literal ``=``. Empty segments (``;;``, a trailing ``;``)
    are skipped.
    """
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        # key: up to a single '=' ("==" is an escaped '=')
        key_chars: list[str] = []
        while i < n:
            ch = text[i]
            if ch == "=":
                if i + 1 < n and text[i + 1] == "=":
                    key_chars.append("=")
                    i += 2
                    continue
                break
            if ch == ";":
                break
            key_chars.append(ch)
            i += 1
        key = "".join(key_chars).strip()
        if i >= n or text[i] == ";":
            if key:
                raise ValueError(f"connection string: key {key!r} has no '=value'")
            i += 1
            continue
        i += 1  # the '='
        while i < n and text[i] in " \t":
            i += 1
        if not key:
            raise ValueError("connection string: a value has no key before its '='")
        if i < n and text[i] in "\"'":
            quote = text[i]
            i += 1
            value_chars: list[str] = []
            while True:
                if i >= n:
                    raise ValueError(f"connection string: unterminated quoted value for {key!r}")
                ch = text[i]
                if ch == quote:
                    if i + 1 < n and text[i + 1] == quote:
                        value_chars.append(quote)
                        i += 2
                        continue
                    i += 1
                    break
                value_chars.append(ch)
                i += 1
            value = "".join(value_chars)
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] != ";":
                raise ValueError(
                    f"connection string: unexpected text after the quoted value of {key!r}"
                )
        else:
            end = text.find(";", i)
            if end == -1:
                end = n
            value = text[i:end].strip()
            i = end
        i += 1  # the ';'
        pairs.append((key, value))
    return pairs


def _parse_int(key: str, value: str, *, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"connection string: {key} must be a whole number") from None
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        bound = f"between {minimum}{upper}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"connection string: {key} must be {bound}, got {number}")
    return number


def _parse_timeout(key: str, value: str) -> float | None:
    """Seconds; Npgsql's 0 means "wait forever", which we keep (asyncpg: None)."""
    try:
        seconds = float(value.strip())
    except ValueError:
        raise ValueError(f"connection string: {key} must be a number of seconds") from None
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"connection string: {key} must be zero or a positive number")
    return None if seconds == 0 else seconds


def _parse_ssl(key: str, value: str) -> SslMode:
    mode = SSL_MODES.get(value.strip().replace("-", "").replace("_", "").lower())
    if mode is None:
        raise ValueError(
            f"connection string: {key} must be one of Disable, Allow, Prefer, Require, "
            f"VerifyCA, VerifyFull; got {value.strip()!r}"
        )
    return mode


def _parse_bool(key: str, value: str) -> bool:
    """``true``/``false`` in any case, as .NET's Convert.ToBoolean reads them."""
    word = value.strip().lower()
    if word not in ("true", "false"):
        raise ValueError(f"connection string: {key} must be true or false")
    return word == "true"


def _parse_seconds(key: str, value: str) -> int | None:
    """Whole seconds; 0 (Npgsql: off) is None."""
    return _parse_int(key, value, minimum=0) or None


def _parse_session_attrs(key: str, value: str) -> str:
    attrs_ = SESSION_ATTRS.get(value.strip().replace("-", "").replace("_", "").lower())
    if attrs_ is None:
        raise ValueError(
            f"connection string: {key} must be one of any, primary, standby, "
            "prefer-primary, prefer-standby, read-write, read-only"
        )
    return attrs_


def _parse_ssl_negotiation(key: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in ("postgres", "direct"):
        raise ValueError(f"connection string: {key} must be Postgres or Direct")
    return word == "direct"


def _parse_options(key: str, value: str) -> tuple[tuple[str, str], ...]:
    """libpq's ``options``: ``-c name=value`` / ``-cname=value`` / ``--name=value``."""
    try:
        tokens = shlex.split(value)
    except ValueError:
        raise ValueError(f"connection string: {key} is not a valid option list") from None
    settings: list[tuple[str, str]] = []
    tokens.reverse()
    while tokens:
        token = tokens.pop()
        if token == "-c" and tokens:
            token = tokens.pop()
        elif token.startswith("--") or token.startswith("-c"):
            token = token[2:]
        else:
            raise ValueError(f"connection string: {key} takes -c name=value settings only")
        name, sep, setting = token.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"connection string: {key} takes -c name=value settings only")
        settings.append((name.replace("-", "_"), setting))
    return tuple(settings)


def _apply(fields: dict[str, object], field: str, key: str, value: str) -> None:
    """Convert one recognised value into ``fields[field]``; ``key`` is for messages."""
    if field in (
        "host",
        "database",
        "user",
        "application_name",
        "search_path",
        "passfile",
        "ssl_root_certificate",
        "ssl_certificate",
        "ssl_key",
        "kerberos_service_name",
        "timezone",
        "ssl_password",
    ):
        fields[field] = value or None
    elif field in ("load_balance_hosts", "pooling", "tcp_keepalive"):
        fields[field] = _parse_bool(key, value)
    elif field == "trust_server_certificate":
        _parse_bool(key, value)  # Npgsql 10: "no longer needed and does nothing"
    elif field in ("keepalive_idle", "keepalive_interval"):
        fields[field] = _parse_seconds(key, value)
    elif field == "idle_lifetime":
        fields[field] = float(_parse_int(key, value, minimum=0))
    elif field == "target_session_attrs":
        fields[field] = _parse_session_attrs(key, value)
    elif field == "ssl_direct":
        fields[field] = _parse_ssl_negotiation(key, value)
    elif field == "options":
        fields[field] = _parse_options(key, value)
    elif field == "password":
        fields[field] = value
    elif field == "port":
        fields[field] = _parse_int(key, value, minimum=1, maximum=65535)
    elif field == "ssl":
        fields[field] = _parse_ssl(key, value)
    elif field == "min_pool_size":
        fields[field] = _parse_int(key, value, minimum=0, maximum=MAX_POOL_SIZE_LIMIT)
    elif field == "max_pool_size":
        fields[field] = _parse_int(key, value, minimum=1, maximum=MAX_POOL_SIZE_LIMIT)
    elif field in ("connect_timeout", "command_timeout"):
        fields[field] = _parse_timeout(key, value)
    else:  # pragma: no cover - every entry of the tables above is handled
        raise AssertionError(field)


def _parse_key_value(text: str) -> dict[str, object]:
    fields: dict[str, object] = {}
    ignored: dict[str, str] = {}
    for key, value in _split_pairs(text):
        norm = _normalise_key(key)
        field = SUPPORTED.get(norm)
        if field is None:
            if norm in IGNORED:
                ignored[norm] = key.strip()
                continue
            raise ValueError(f"connection string: unknown key {key!r}")
        # A repeated key (or two synonyms) keeps the last value, as in Npgsql.
        _apply(fields, field, key, value)
    fields["ignored"] = tuple(ignored.values())
    host = fields.get("host")
    if isinstance(host, str):
        _split_hosts(fields, host)
    return fields


def _host_and_port(spec: str) -> tuple[str, int | None]:
    """``name``, ``name:port``, ``[v6]:port``, a bare IPv6 address or a socket directory."""
    spec = spec.strip()
    if spec.startswith("["):
        name, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            return name, _parse_int("Host port", rest[1:], minimum=1, maximum=65535)
        return name, None
    if not spec.startswith("/") and spec.count(":") == 1:
        name, _, port = spec.partition(":")
        return name, _parse_int("Host port", port, minimum=1, maximum=65535)
    return spec, None


def _split_hosts(fields: dict[str, object], host: str) -> None:
    """Npgsql's ``Host=a:5433,b``: each host may carry its port, else Port applies."""
    default_port = fields.get("port", DEFAULT_PORT)
    assert isinstance(default_port, int)
    hosts = [_host_and_port(spec) for spec in host.split(",")]
    if any(not name for name, _ in hosts):
        raise ValueError("connection string: Host has an empty entry in its list")
    resolved = [(name, port if port is not None else default_port) for name, port in hosts]
    (fields["host"], fields["port"]), *rest = resolved
    fields["other_hosts"] = tuple(rest)


# --- URL form --------------------------------------------------------------------------

# libpq's query parameters, plus the pool and command timeout the key/value form allows.
_URL_QUERY: Final[dict[str, str]] = {
    "host": "host",
    "port": "port",
    "dbname": "database",
    "user": "user",
    "password": "password",
    "sslmode": "ssl",
    "connect_timeout": "connect_timeout",
    "application_name": "application_name",
    "command_timeout": "command_timeout",
    "min_pool_size": "min_pool_size",
    "max_pool_size": "max_pool_size",
    "search_path": "search_path",
    "passfile": "passfile",
    "sslrootcert": "ssl_root_certificate",
    "sslcert": "ssl_certificate",
    "sslkey": "ssl_key",
    "sslpassword": "ssl_password",
    "target_session_attrs": "target_session_attrs",
    "krbsrvname": "kerberos_service_name",
    "options": "options",
}


def _parse_url(text: str) -> dict[str, object]:
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ValueError("connection string: the URL's host or port is malformed") from None
    if url.fragment:
        raise ValueError("connection string: a PostgreSQL URL has no #fragment")
    fields: dict[str, object] = {}
    if url.hostname:
        fields["host"] = urllib.parse.unquote(url.hostname)
    if port is not None:
        if not 1 <= port <= 65535:
            raise ValueError("connection string: the URL's port must be between 1 and 65535")
        fields["port"] = port
    if url.username:
        fields["user"] = urllib.parse.unquote(url.username)
    if url.password is not None:
        fields["password"] = urllib.parse.unquote(url.password)
    path = url.path.lstrip("/")
    if "/" in path:
        raise ValueError("connection string: the URL's path must be just the database name")
    if path:
        fields["database"] = urllib.parse.unquote(path)
    try:
        query = urllib.parse.parse_qsl(url.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        if url.query:
            raise ValueError("connection string: the URL's query string is malformed") from None
        query = []
    for key, value in query:
        field = _URL_QUERY.get(key.lower())
        if field is None:
            raise ValueError(f"connection string: unknown URL parameter {key!r}")
        _apply(fields, field, key, value)
    host = fields.get("host")
    if isinstance(host, str) and "," in host:
        _split_hosts(fields, host)
    return fields


def parse_connection_string(text: str) -> PostgresParams:
    """Parse an Npgsql key/value string or a ``postgresql://`` / ``postgres://`` URL.

    Raises :class:`ValueError` with a message naming the offending key (never a value
    that could be the password).
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("connection string is empty")
    scheme, sep, _ = stripped.partition("://")
    if sep and "=" not in scheme and ";" not in scheme:
        if scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(
                f"connection string: unsupported URL scheme {scheme!r} "
                "(use postgresql:// or postgres://)"
            )
        fields = _parse_url(stripped)
    else:
        fields = _parse_key_value(stripped)
    if not fields.get("host"):
        raise ValueError("connection string: Host is required")
    params = PostgresParams(**fields)  # type: ignore[arg-type]
    if params.min_pool_size > params.max_pool_size:
        raise ValueError(
            "connection string: Minimum Pool Size "
            f"({params.min_pool_size}) exceeds Maximum Pool Size ({params.max_pool_size})"
        )
    return params


def redacted(params: PostgresParams) -> str:
    """A one-line description for logs, with the password replaced by ``***``."""
    parts = [
        f"host={params.host}",
        f"port={params.port}",
        *(f"host={host}:{port}" for host, port in params.other_hosts),
        f"database={params.database or '(default)'}",
        f"user={params.user or '(default)'}",
        f"password={'***' if params.password else '(none)'}",
        f"ssl={params.ssl or '(default)'}",
        f"pool={params.min_pool_size}..{params.max_pool_size}",
        f"timeout={params.connect_timeout}s",
        f"command_timeout={params.command_timeout}s",
    ]
    return " ".join(parts)


def connect_arguments(params: PostgresParams) -> dict[str, Any]:
    """The keyword arguments of ``asyncpg.connect`` (and so ``create_pool``) for ``params``.

    TLS files travel in a libpq-style DSN query, so asyncpg applies libpq's (and since
    Npgsql 8, Npgsql's) rules for them: with ``sslrootcert`` even ``require`` verifies.
    """
    hosts = [(params.host, params.port), *params.other_hosts]
    args: dict[str, Any] = {
        "host": params.host if len(hosts) == 1 else [h for h, _ in hosts],
        "port": params.port if len(hosts) == 1 else [p for _, p in hosts],
        "user": params.user,
        "password": params.password,
        "database": params.database,
        "ssl": params.ssl,
        "server_settings": _server_settings(params) or None,
    }
    tls_files = {
        "sslrootcert": params.ssl_root_certificate,
        "sslcert": params.ssl_certificate,
        "sslkey": params.ssl_key,
        "sslpassword": params.ssl_password,
    }
    query = {name: value for name, value in tls_files.items() if value is not None}
    if query:
        if params.ssl is not None:
            query["sslmode"] = params.ssl
        args["ssl"] = None
        args["dsn"] = "postgresql://?" + urllib.parse.urlencode(query)
    optional = {
        "passfile": params.passfile,
        "target_session_attrs": params.target_session_attrs,
        "krbsrvname": params.kerberos_service_name,
        "direct_tls": True if params.ssl_direct else None,
    }
    args.update({name: value for name, value in optional.items() if value is not None})
    return args


def _server_settings(params: PostgresParams) -> dict[str, str]:
    """Run-time parameters sent at connect: Options first, the named keywords win."""
    settings = dict(params.options)
    named = {
        "application_name": params.application_name,
        "search_path": params.search_path,
        "TimeZone": params.timezone,
    }
    settings.update({name: value for name, value in named.items() if value})
    return settings
