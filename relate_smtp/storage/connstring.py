"""``ConnectionStrings:DefaultConnection`` → the parameters the PostgreSQL store connects with.

The original host hands this string to Npgsql, so operators already have strings in
Npgsql's key/value form (``Host=db;Database=relate;Username=relate;Password=…``); newer
deployments (and most PaaS add-ons) hand out ``postgresql://`` URLs. Both are accepted
(SPEC §2).

Npgsql rejects keys it does not know, and so do we: a typo such as ``Databse=`` must stop
start-up rather than silently connect somewhere else. Keys Npgsql knows that only tune
its own driver (keepalives, buffer sizes, enlisting, …) are accepted and ignored, so a
string copied from the original keeps working. Keys whose meaning we cannot honour and
that would change security or routing (client certificates, Kerberos, multiple hosts)
are refused by name instead of ignored.

Error messages name the key and the problem but never echo the string or a value that
might be the password.
"""

from __future__ import annotations

import urllib.parse
from typing import Final, Literal

import attrs

__all__ = ["DEFAULT_MAX_POOL_SIZE", "PostgresParams", "parse_connection_string", "redacted"]

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

# Npgsql's own default is 100, which is PostgreSQL's whole default ``max_connections``:
# two hosts at that size exhaust the server. An SMTP save is a short transaction, so 20
# connections carry thousands of messages a second; operators can raise it explicitly.
DEFAULT_MAX_POOL_SIZE: Final = 20
DEFAULT_MIN_POOL_SIZE: Final = 0  # Npgsql's default: no connection is opened before use
DEFAULT_CONNECT_TIMEOUT: Final = 15.0  # Npgsql "Timeout" default, seconds
DEFAULT_COMMAND_TIMEOUT: Final = 30.0  # Npgsql "Command Timeout" default, seconds
DEFAULT_PORT: Final = 5432
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


# --- Npgsql key/value form -------------------------------------------------------------

# Canonical field name for every supported Npgsql keyword and synonym. Keys are compared
# case-insensitively with spaces removed, as Npgsql's builder effectively does for its
# documented spellings ("User Id", "UserId", "User ID").
_SUPPORTED: Final[dict[str, str]] = {
    "host": "host",
    "server": "host",
    "port": "port",
    "database": "database",
    "db": "database",
    "username": "user",
    "user": "user",
    "userid": "user",
    "password": "password",
    "pwd": "password",
    "psw": "password",
    "sslmode": "ssl",
    "minimumpoolsize": "min_pool_size",
    "minpoolsize": "min_pool_size",
    "maximumpoolsize": "max_pool_size",
    "maxpoolsize": "max_pool_size",
    "timeout": "connect_timeout",
    "connecttimeout": "connect_timeout",
    "commandtimeout": "command_timeout",
    "applicationname": "application_name",
    "searchpath": "search_path",
}

# Npgsql keywords that tune Npgsql itself; harmless to ignore here.
_IGNORED: Final = frozenset(
    {
        "pooling",  # asyncpg always pools; Pooling=false only cost Npgsql performance
        "includeerrordetail",
        "trustservercertificate",
        "persistsecurityinfo",
        "logparameters",
        "connectionidlelifetime",
        "connectionpruninginterval",
        "connectionlifetime",
        "loadbalancetimeout",
        "cancellationtimeout",
        "internalcommandtimeout",
        "keepalive",
        "tcpkeepalive",
        "tcpkeepalivetime",
        "tcpkeepaliveinterval",
        "maxautoprepare",
        "autoprepareminusages",
        "readbuffersize",
        "writebuffersize",
        "socketreceivebuffersize",
        "socketsendbuffersize",
        "noresetonclose",
        "enlist",
        "servercompatibilitymode",
        "arraynullabilitymode",
        "loadtablecomposites",
        "checkcertificaterevocation",
        "encoding",
        "clientencoding",
    }
)

# Npgsql keywords whose effect we cannot reproduce and that must not be silently dropped.
_UNSUPPORTED: Final = frozenset(
    {
        "sslcertificate",
        "sslkey",
        "sslpassword",
        "rootcertificate",
        "integratedsecurity",
        "kerberosservicename",
        "includerealm",
        "gssencryptionmode",
        "channelbinding",
        "sslnegotiation",
        "passfile",
        "targetsessionattributes",
        "loadbalancehosts",
        "hostrecheckseconds",
        "options",
        "timezone",
    }
)

_SSL_MODES: Final[dict[str, SslMode]] = {
    "disable": "disable",
    "allow": "allow",
    "prefer": "prefer",
    "require": "require",
    "verifyca": "verify-ca",
    "verifyfull": "verify-full",
}


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
    mode = _SSL_MODES.get(value.strip().replace("-", "").replace("_", "").lower())
    if mode is None:
        raise ValueError(
            f"connection string: {key} must be one of Disable, Allow, Prefer, Require, "
            f"VerifyCA, VerifyFull; got {value.strip()!r}"
        )
    return mode


def _apply(fields: dict[str, object], field: str, key: str, value: str) -> None:
    """Convert one recognised value into ``fields[field]``; ``key`` is for messages."""
    if field in ("host", "database", "user", "application_name", "search_path"):
        fields[field] = value or None
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
    for key, value in _split_pairs(text):
        norm = _normalise_key(key)
        field = _SUPPORTED.get(norm)
        if field is None:
            if norm in _IGNORED:
                continue
            if norm in _UNSUPPORTED:
                raise ValueError(f"connection string: {key!r} is not supported by relate-smtp")
            raise ValueError(f"connection string: unknown key {key!r}")
        # A repeated key (or two synonyms) keeps the last value, as in Npgsql.
        _apply(fields, field, key, value)
    host = fields.get("host")
    if isinstance(host, str) and "," in host:
        raise ValueError("connection string: multiple hosts are not supported by relate-smtp")
    if isinstance(host, str) and not host.startswith("/") and host.count(":") == 1:
        # Npgsql accepts "Host=db:5433"
        name, _, port = host.partition(":")
        fields["host"] = name
        fields["port"] = _parse_int("Host port", port, minimum=1, maximum=65535)
    return fields


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
        raise ValueError("connection string: multiple hosts are not supported by relate-smtp")
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
        f"database={params.database or '(default)'}",
        f"user={params.user or '(default)'}",
        f"password={'***' if params.password else '(none)'}",
        f"ssl={params.ssl or '(default)'}",
        f"pool={params.min_pool_size}..{params.max_pool_size}",
        f"timeout={params.connect_timeout}s",
        f"command_timeout={params.command_timeout}s",
    ]
    return " ".join(parts)
