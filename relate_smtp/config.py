"""Settings: defaults → appsettings*.json → environment (``Smtp__Port``) → ``--Key:Path`` overrides.

The keys and defaults are the original C# host's (ASP.NET configuration layout) plus
the additions listed in SPEC §2. Every value is typed and validated here so that the
rest of the program never sees a raw string.
"""

from __future__ import annotations

import ipaddress

import attrs

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(kw_only=True)
class MxSettings:
    enabled: bool = False
    port: int = 25
    hosted_domains: tuple[str, ...] = ()  # lower-case, no trailing dot
    validate_recipients: bool = True


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
    command_timeout_seconds: float = 300.0
    data_timeout_seconds: float = 180.0
    min_data_rate_bytes_per_second: int = 500
    tls_handshake_timeout_seconds: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    connection_limit_exempt_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    shutdown_timeout_seconds: float = 20.0
    restrict_sender_to_login: bool = False
    mx: MxSettings = MxSettings()
    proxy_protocol: ProxyProtocolSettings = ProxyProtocolSettings()


@attrs.frozen(kw_only=True)
class RateLimitSettings:
    max_failed_attempts: int = 5
    lockout_window_minutes: float = 15.0
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


@attrs.frozen(kw_only=True)
class ApiSettings:
    base_url: str = "http://localhost:5000"
    timeout_seconds: float = 10.0


@attrs.frozen(kw_only=True)
class HealthCheckSettings:
    url: str = "http://localhost:8081"
    dns_mx_domain: str = "gmail.com"
    # Derived from ``url`` when loading: "+" / "*" mean all interfaces.
    host: str = "localhost"
    port: int = 8081


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
