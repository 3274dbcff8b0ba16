"""The typed settings, one record per section; each field declares its setting once.

Keys and defaults are the original C# host's (ASP.NET configuration layout) plus the
additions of SPEC §2. A default that the protocol core or the MIME parser also needs is
taken from their records (`ProtocolConfig`, `MimeLimits`, `ParseLimits`), so each has one
home. ``original=True`` marks the original's keys: the documentation lists them apart.
"""

from __future__ import annotations

import ipaddress
from typing import Final

import attrs

from relate_smtp.config import converters as parse
from relate_smtp.config.converters import IPNetwork, LogLevel
from relate_smtp.config.declarations import Setting, array, declared, record, section, setting
from relate_smtp.config.sources import DEFAULT_ENVIRONMENT
from relate_smtp.config.timespan import format_timespan
from relate_smtp.handlers.limits import MimeLimits, ParseLimits
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import BareLineEndings, ProtocolConfig
from relate_smtp.sender_auth import SenderAuthSettings

__all__ = [
    "KNOWN_KEYS",
    "ApiSettings",
    "HealthCheckSettings",
    "MimeSettings",
    "MxSettings",
    "OtelSettings",
    "ProxyProtocolSettings",
    "RateLimitSettings",
    "SecuritySettings",
    "Settings",
    "SmtpSettings",
    "StorageSettings",
]

_PROTOCOL: Final = ProtocolConfig()
_MIME: Final = MimeLimits()
_PARSE: Final = ParseLimits()
_SENDER_AUTH: Final = SenderAuthSettings()


@attrs.frozen(kw_only=True)
class MxSettings:
    """``Smtp:Mx``: the listener for mail from other servers to the hosted domains."""

    enabled: bool = setting(
        "Smtp:Mx:Enabled",
        parse.boolean,
        False,
        "open the MX listener; needs `Smtp:Mx:HostedDomains` (open-relay guard)",
        original=True,
    )
    port: int = setting(
        "Smtp:Mx:Port", parse.port, 25, "MX port, 0–65535; 0 picks a free port", original=True
    )
    hosted_domains: tuple[str, ...] = array(
        "Smtp:Mx:HostedDomains",
        parse.domain,
        (),
        "domains accepted on MX; stored lower-case, without a trailing dot, IDNs as A-labels "
        "(`xn--…`)",
        original=True,
    )
    validate_recipients: bool = setting(
        "Smtp:Mx:ValidateRecipients",
        parse.boolean,
        True,
        "on MX, reject unknown users at hosted domains",
        original=True,
    )
    # Issue 15: SPF, DKIM and DMARC of unauthenticated MX mail (sender_auth/).
    sender_authentication: SenderAuthSettings = record(
        _SENDER_AUTH,
        mode=Setting(
            key="Smtp:Mx:SenderAuthentication:Mode",
            convert=parse.sender_auth_mode,
            default=_SENDER_AUTH.mode,
            doc="SPF, DKIM and DMARC of unauthenticated MX mail: `off` (no DNS query), "
            "`observe` (check, log, count; never refuse) or `enforce` (as observe, and a "
            "DMARC `p=reject`/`sp=reject` failure gets 550 5.7.1 at the end of data)",
        ),
        dns_servers=Setting(
            key="Smtp:Mx:SenderAuthentication:DnsServers",
            convert=parse.name_server,
            default=_SENDER_AUTH.dns_servers,
            doc="recursive resolvers for those checks: `192.0.2.53`, `192.0.2.53:5353`, "
            "`[2001:db8::53]:5353`; empty → the system's (`/etc/resolv.conf`)",
            many=True,
        ),
        dns_timeout_seconds=Setting(
            key="Smtp:Mx:SenderAuthentication:DnsTimeoutSeconds",
            convert=parse.positive_number,
            default=_SENDER_AUTH.dns_timeout_seconds,
            doc="bound on one DNS lookup, > 0; a lookup that times out is a temporary error "
            "and never refuses a message",
        ),
        reject_spf_fail=Setting(
            key="Smtp:Mx:SenderAuthentication:RejectSpfFail",
            convert=parse.boolean,
            default=_SENDER_AUTH.reject_spf_fail,
            doc="in `enforce`, also refuse SPF `fail` when the author domain publishes no "
            "DMARC record",
        ),
    )


@attrs.frozen(kw_only=True)
class MimeSettings:
    """``Smtp:Mime``: what parsing one message may cost (defaults in the limit records)."""

    limits: MimeLimits = record(
        _MIME,
        max_parts=Setting(
            key="Smtp:Mime:MaxParts",
            convert=parse.positive_int,
            default=_MIME.max_parts,
            doc="MIME entities per message (the message itself included); more → 554 5.6.0, "
            "nothing stored",
        ),
        max_nesting_depth=Setting(
            key="Smtp:Mime:MaxNestingDepth",
            convert=parse.positive_int,
            default=_MIME.max_nesting_depth,
            doc="multipart and message/* nesting (Postfix's `mime_nesting_limit`); deeper → "
            "554 5.6.0",
        ),
        max_header_bytes=Setting(
            key="Smtp:Mime:MaxHeaderBytes",
            convert=parse.positive_int,
            default=_MIME.max_header_bytes,
            doc="one header field with its folding, in any part (Postfix's "
            "`header_size_limit`); longer → 554 5.6.0",
        ),
        max_header_recipients=Setting(
            key="Smtp:Mime:MaxHeaderRecipients",
            convert=parse.positive_int,
            default=_MIME.max_header_recipients,
            doc="To/Cc/Bcc mailboxes stored as rows; the rest are dropped with one log line "
            "(envelope recipients are always linked)",
        ),
    )
    parse: ParseLimits = record(
        _PARSE,
        cpu_seconds=Setting(
            key="Smtp:Mime:ParseCpuSeconds",
            convert=parse.positive_number,
            default=_PARSE.cpu_seconds,
            doc="CPU time for parsing one message over 64 KiB in a worker process; past it → "
            "451 4.3.0",
        ),
        memory_bytes=Setting(
            key="Smtp:Mime:ParseMemoryBytes",
            convert=parse.memory_bytes,
            default=_PARSE.memory_bytes,
            doc="address space of a parsing worker process (≥ 256 MiB); past it → 451 4.3.0",
        ),
    )


@attrs.frozen(kw_only=True)
class ProxyProtocolSettings:
    """``Smtp:ProxyProtocol``: listeners behind a load balancer that sends PROXY headers."""

    listeners: tuple[ListenerKind, ...] = array(
        "Smtp:ProxyProtocol:Listeners",
        parse.listener_kind,
        (),
        "listeners expecting a PROXY v1/v2 header: `submission`, `submission-tls`, `mx`",
    )
    trusted_networks: tuple[IPNetwork, ...] = array(
        "Smtp:ProxyProtocol:TrustedNetworks",
        parse.network,
        (),
        "peers allowed to send it (CIDR or one address); required when Listeners is not empty",
    )


@attrs.frozen(kw_only=True)
class SmtpSettings:
    """``Smtp``: the listeners, their limits and their clocks."""

    server_name: str = setting(
        "Smtp:ServerName",
        parse.server_name,
        _PROTOCOL.hostname,
        "name in the greeting and EHLO reply: one word without spaces; a DNS name is used in "
        "ASCII form (IDN as A-label), anything else (`mail_1`, an IP address) as given, with "
        "a warning at start",
        original=True,
    )
    port: int = setting(
        "Smtp:Port",
        parse.port,
        587,
        "submission (STARTTLS) port, 0–65535; 0 picks a free port",
        original=True,
    )
    secure_port: int = setting(
        "Smtp:SecurePort",
        parse.secure_port,
        465,
        "implicit TLS port; 0 or less disables it (as in the original)",
        original=True,
    )
    require_authentication: bool = setting(
        "Smtp:RequireAuthentication",
        parse.boolean,
        _PROTOCOL.auth_required,
        "submission listeners require AUTH before MAIL",
        original=True,
    )
    # Paths are checked against the working directory when loading (rules.py).
    certificate_path: str | None = setting(
        "Smtp:CertificatePath",
        parse.text,
        None,
        "PFX/PKCS#12, DER or PEM certificate; must be a readable file (relative paths are "
        "from the working directory)",
        original=True,
    )
    certificate_password: str | None = setting(
        "Smtp:CertificatePassword", parse.secret, None, "PFX password", original=True, verbatim=True
    )
    certificate_key_path: str | None = setting(
        "Smtp:CertificateKeyPath",
        parse.text,
        None,
        "PEM private key when the certificate file has none; needs `Smtp:CertificatePath`",
    )
    max_attachment_size_bytes: int = setting(
        "Smtp:MaxAttachmentSizeBytes",
        parse.positive_int,
        26_214_400,
        "largest decoded attachment, ≥ 1",
        original=True,
    )
    max_message_size_bytes: int = setting(
        "Smtp:MaxMessageSizeBytes",
        parse.positive_int,
        _PROTOCOL.max_message_size,
        "largest raw message, advertised with SIZE, ≥ 1",
        original=True,
    )
    allow_insecure_auth: bool = setting(
        "Smtp:AllowInsecureAuth",
        parse.boolean,
        _PROTOCOL.allow_insecure_auth,
        "offer AUTH before STARTTLS on the submission port",
    )
    bare_line_endings: BareLineEndings = setting(
        "Smtp:BareLineEndings",
        parse.bare_line_endings,
        _PROTOCOL.bare_line_endings,
        "`normalize` or `reject`",
    )
    max_recipients: int = setting(
        "Smtp:MaxRecipients",
        parse.positive_int,
        _PROTOCOL.max_recipients,
        "RCPTs per message, ≥ 1",
    )
    max_errors: int = setting(
        "Smtp:MaxErrors",
        parse.positive_int,
        _PROTOCOL.max_errors,
        "protocol errors per session before 421, ≥ 1",
    )
    max_recipient_errors: int = setting(
        "Smtp:MaxRecipientErrors",
        parse.positive_int,
        _PROTOCOL.max_recipient_errors,
        "refused RCPTs per session before 421 4.7.0 (Postfix's `smtpd_hard_error_limit`), "
        "counted apart from `MaxErrors` and cleared by each accepted message, ≥ 1",
    )
    # The session clocks: RFC 5321 §4.5.3.2's command and data timeouts.
    command_timeout_seconds: float = setting(
        "Smtp:CommandTimeoutSeconds",
        parse.positive_number,
        300.0,
        "time for a whole command line, > 0",
    )
    data_timeout_seconds: float = setting(
        "Smtp:DataTimeoutSeconds",
        parse.positive_number,
        180.0,
        "wait for the next data block, > 0",
    )
    min_data_rate_bytes_per_second: int = setting(
        "Smtp:MinDataRateBytesPerSecond",
        parse.count,
        500,
        "slower DATA/BDAT is cut with 421; 0 disables",
    )
    tls_handshake_timeout_seconds: float = setting(
        "Smtp:TlsHandshakeTimeoutSeconds",
        parse.positive_number,
        30.0,
        "TLS handshake limit, > 0",
    )
    max_connections: int = setting(
        "Smtp:MaxConnections",
        parse.positive_int,
        1000,
        "concurrent sessions in all, ≥ 1",
    )
    max_connections_per_ip: int = setting(
        "Smtp:MaxConnectionsPerIp",
        parse.count,
        50,
        "concurrent sessions per client (IPv4 address, or IPv6 prefix: "
        "`Smtp:ClientIpv6PrefixLength`); 0 = no limit",
    )
    # A site gets a /64 (RFC 6177), so an IPv6 client is counted by its prefix.
    client_ipv6_prefix_length: int = setting(
        "Smtp:ClientIpv6PrefixLength",
        parse.ipv6_prefix_length,
        64,
        "IPv6 clients count as their /N network (1–128) for `MaxConnectionsPerIp` and the "
        "AUTH rate limit; IPv4 clients count per address",
    )
    connection_limit_exempt_networks: tuple[IPNetwork, ...] = array(
        "Smtp:ConnectionLimitExemptNetworks",
        parse.network,
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        "networks the per-IP limit ignores (CIDR or one address), judged on the client's own "
        "address",
    )
    shutdown_timeout_seconds: float = setting(
        "Smtp:ShutdownTimeoutSeconds",
        parse.positive_number,
        20.0,
        "time for DATA in flight after SIGTERM, > 0",
    )
    restrict_sender_to_login: bool = setting(
        "Smtp:RestrictSenderToLogin",
        parse.boolean,
        False,
        "authenticated MAIL FROM must be one of the user's addresses",
    )
    spool_threshold_bytes: int = setting(
        "Smtp:SpoolThresholdBytes",
        parse.positive_int,
        1024 * 1024,
        "a message beyond this goes to a private spool file (0600, `Storage:SpoolPath`) as it "
        "arrives; smaller ones stay in memory",
    )
    max_buffered_bytes: int = setting(
        "Smtp:MaxBufferedBytes",
        parse.positive_int,
        256 * 1024 * 1024,
        "memory that parsing and storing messages over 64 KiB may hold at once (twice each "
        "message's size); a message that does not fit waits (up to the data timeout, then "
        "452 4.3.1); one message always passes",
    )
    mx: MxSettings = section(MxSettings())
    mime: MimeSettings = section(MimeSettings())
    proxy_protocol: ProxyProtocolSettings = section(ProxyProtocolSettings())


@attrs.frozen(kw_only=True)
class HealthCheckSettings:
    """``HealthCheck``: where /healthz and /metrics listen, and what they probe."""

    url: str = setting(
        "HealthCheck:Url",
        parse.health_urls,
        "http://localhost:8081",
        "where `/healthz` and `/metrics` listen, read as Kestrel reads it (`+`, `*`, "
        "`0.0.0.0`, `[::]` or a name: every interface, IPv6 and IPv4; `localhost`: both "
        "loopbacks; several URLs separated by `;`); see below",
        original=True,
    )
    dns_mx_domain: str = setting(
        "HealthCheck:DnsMxDomain",
        parse.domain_or_empty,
        "gmail.com",
        "domain for the dns-mx check; empty disables it",
        verbatim=True,
    )
    # One (host, port) per URL of ``url``: host ``::`` is every interface of both
    # families, ``localhost`` both loopbacks, else one IP address.
    endpoints: tuple[tuple[str, int], ...] = attrs.field(
        default=attrs.Factory(
            lambda self: parse.health_endpoints("HealthCheck:Url", self.url), takes_self=True
        )
    )


@attrs.frozen(kw_only=True)
class ApiSettings:
    """``Api``: the Relate API that is told about new mail."""

    base_url: str = setting(
        "Api:BaseUrl",
        parse.http_url,
        "http://localhost:5000",
        "Relate API for notifications; an `http://` or `https://` URL. The notification path "
        "replaces any path in it, as .NET's HttpClient resolves it: `http://api:5000/relate/` "
        "posts to `http://api:5000/api/internal/notifications/new-email`",
        original=True,
    )
    timeout_seconds: float = setting(
        "Api:TimeoutSeconds",
        parse.positive_number,
        10.0,
        "notification request timeout, > 0",
    )


@attrs.frozen(kw_only=True)
class RateLimitSettings:
    """The original's ``AuthenticationRateLimitOptions``; the three delays are its
    TimeSpans, in seconds."""

    max_failed_attempts: int = setting(
        "Security:RateLimit:MaxFailedAttempts",
        parse.int32,
        5,
        "failures that lock a client out; 1 or less locks at the first failure (as in the "
        "original)",
        original=True,
    )
    lockout_window_seconds: float = setting(
        "Security:RateLimit:LockoutWindow",
        parse.positive_timespan,
        900.0,
        "TimeSpan, > 0: a lockout lasts until the first failure + this, and a client's "
        "failures are forgotten this long after its last one",
        original=True,
        shown=format_timespan,
    )
    base_backoff_delay_seconds: float = setting(
        "Security:RateLimit:BaseBackoffDelay",
        parse.timespan,
        1.0,
        "TimeSpan: after n failures the next try waits this × 2^(n−1) from the last failure; "
        "0 or negative: no wait",
        original=True,
        shown=format_timespan,
    )
    max_backoff_delay_seconds: float = setting(
        "Security:RateLimit:MaxBackoffDelay",
        parse.timespan,
        30.0,
        "TimeSpan: backoff cap; 0 or negative: no wait",
        original=True,
        shown=format_timespan,
    )


@attrs.frozen(kw_only=True)
class SecuritySettings:
    """``Security``: the AUTH cache key and the AUTH rate limit."""

    authentication_salt: str = setting(
        "Security:AuthenticationSalt",
        parse.text,
        "",
        "HMAC key for the auth cache; empty → random per process",
        original=True,
        verbatim=True,
    )
    rate_limit: RateLimitSettings = section(RateLimitSettings())


@attrs.frozen(kw_only=True)
class StorageSettings:
    """``Storage``: the embedded store and the spool for large messages."""

    sqlite_path: str = setting(
        "Storage:SqlitePath",
        parse.text,
        "relate-smtp.db",
        "embedded store file, relative to the working directory",
    )
    discard_messages: bool = setting(
        "Storage:DiscardMessages",
        parse.boolean,
        False,
        "accept and drop messages without parsing or storing",
    )
    # None: the system's temporary directory.
    spool_path: str | None = setting(
        "Storage:SpoolPath",
        parse.text,
        None,
        "existing writable directory for spool files; files a killed process left are "
        "removed at start",
        shown="system temp dir",
    )


@attrs.frozen(kw_only=True)
class OtelSettings:
    """``Otel``: where traces and metrics go over OTLP, as the original's telemetry."""

    endpoint: str = setting(
        "Otel:Endpoint",
        parse.otlp_endpoint,
        "",
        "OTLP collector (`http://collector:4317`; gRPC unless `OTEL_EXPORTER_OTLP_PROTOCOL` "
        "is `http/protobuf`, then `/v1/traces` and `/v1/metrics` are appended to it): traces "
        "and metrics of service `relate-mail-smtp` are exported there; empty → none, at no "
        "cost",
        original=True,
    )


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the server reads from its configuration, typed and validated."""

    smtp: SmtpSettings = section(SmtpSettings())
    default_connection: str = setting(
        "ConnectionStrings:DefaultConnection",
        parse.connection_string,
        "",
        "PostgreSQL (`Host=…;Database=…` with any Npgsql keyword, or `postgresql://…`); "
        "empty → embedded SQLite with a warning naming the file, but with "
        "`DOTNET_ENVIRONMENT`/`ASPNETCORE_ENVIRONMENT` (or `--environment`) set to "
        "`Production` and no `Storage:SqlitePath` the server refuses to start (exit 2), as "
        "the original",
        original=True,
        verbatim=True,
    )
    health_check: HealthCheckSettings = section(HealthCheckSettings())
    api: ApiSettings = section(ApiSettings())
    internal_api_key: str | None = setting(
        "Internal:ApiKey",
        parse.secret,
        None,
        "sent as `Authorization: ApiKey <key>`; none → header omitted",
        original=True,
        verbatim=True,
    )
    security: SecuritySettings = section(SecuritySettings())
    storage: StorageSettings = section(StorageSettings())
    otel: OtelSettings = section(OtelSettings())
    log_level: LogLevel = setting(
        "Logging:LogLevel:Default",
        parse.log_level,
        LogLevel.INFORMATION,
        "`Trace`, `Debug`, `Information`, `Warning`, `Error`, `Critical` or `None` (any "
        "case, or 0–6)",
    )
    environment: str = DEFAULT_ENVIRONMENT  # not a key: the environment name (sources.py)


#: Every key the loader reads, in the canonical spelling that error messages use.
KNOWN_KEYS: Final[tuple[str, ...]] = tuple(item.setting.key for item in declared(Settings))
