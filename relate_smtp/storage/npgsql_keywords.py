"""The vocabulary of Npgsql connection strings (SPEC §8): every keyword and synonym
Npgsql knows, which field each supported one sets, which are accepted without effect,
and how enumerated values translate to asyncpg's."""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["IGNORED", "SESSION_ATTRS", "SSL_MODES", "SUPPORTED", "SslMode"]

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

# Canonical field name for every supported Npgsql keyword and synonym. Keys are compared
# case-insensitively with spaces removed, as Npgsql's builder effectively does for its
# documented spellings ("User Id", "UserId", "User ID").
SUPPORTED: Final[dict[str, str]] = {
    "host": "host",
    "server": "host",
    "port": "port",
    "database": "database",
    "db": "database",
    "username": "user",
    "user": "user",
    "userid": "user",
    "uid": "user",
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
    "passfile": "passfile",
    "rootcertificate": "ssl_root_certificate",
    "sslcertificate": "ssl_certificate",
    "sslkey": "ssl_key",
    "sslpassword": "ssl_password",
    "sslnegotiation": "ssl_direct",
    "trustservercertificate": "trust_server_certificate",
    "targetsessionattributes": "target_session_attrs",
    "loadbalancehosts": "load_balance_hosts",
    "kerberosservicename": "kerberos_service_name",
    "krbsrvname": "kerberos_service_name",
    "timezone": "timezone",
    "options": "options",
    "connectionidlelifetime": "idle_lifetime",
    "pooling": "pooling",
    "keepalive": "keepalive_idle",
    "tcpkeepalive": "tcp_keepalive",
    "tcpkeepalivetime": "keepalive_idle",
    "tcpkeepaliveinterval": "keepalive_interval",
}

# Npgsql keywords with no asyncpg counterpart: accepted, named in one start-up warning.
IGNORED: Final = frozenset(
    {
        "enlist",
        "clientencoding",  # asyncpg always speaks UTF-8
        "encoding",
        "gssencryptionmode",
        "checkcertificaterevocation",
        "includerealm",
        "persistsecurityinfo",
        "logparameters",
        "includeerrordetail",
        "includefailedbatchedcommand",
        "channelbinding",
        "requireauth",
        "connectionpruninginterval",
        "connectionlifetime",
        "loadbalancetimeout",
        "cancellationtimeout",
        "hostrecheckseconds",
        "readbuffersize",
        "writebuffersize",
        "socketreceivebuffersize",
        "socketsendbuffersize",
        "maxautoprepare",
        "autoprepareminusages",
        "noresetonclose",
        "replicationmode",
        "arraynullabilitymode",
        "multiplexing",
        "writecoalescingbufferthresholdbytes",
        "loadtablecomposites",
        "servercompatibilitymode",
        "internalcommandtimeout",
    }
)

# Npgsql's Target Session Attributes → asyncpg's; asyncpg has no prefer-primary, and
# "any" is what it falls back to.
SESSION_ATTRS: Final[dict[str, str]] = {
    "any": "any",
    "primary": "primary",
    "standby": "standby",
    "preferprimary": "any",
    "preferstandby": "prefer-standby",
    "readwrite": "read-write",
    "readonly": "read-only",
}

SSL_MODES: Final[dict[str, SslMode]] = {
    "disable": "disable",
    "allow": "allow",
    "prefer": "prefer",
    "require": "require",
    "verifyca": "verify-ca",
    "verifyfull": "verify-full",
}
