"""Value conversion: what each kind of value accepts, and every error message."""

from __future__ import annotations

from pathlib import Path

import pytest

from relate_smtp.config import (
    KNOWN_KEYS,
    LogLevel,
    is_host_name,
)
from tests.config.helpers import error, load, write


def test_empty_dns_mx_domain_disables_the_check(tmp_path: Path) -> None:
    assert load(tmp_path, HealthCheck__DnsMxDomain="").health_check.dns_mx_domain == ""
    assert load(tmp_path, HealthCheck__DnsMxDomain="MX.Example.").health_check.dns_mx_domain == (
        "mx.example"
    )


@pytest.mark.parametrize(("value", "level"), [("TRACE", "Trace"), ("none", "None"), ("4", "Error")])
def test_log_level_names(tmp_path: Path, value: str, level: str) -> None:
    assert load(tmp_path, f"--Logging:LogLevel:Default={value}").log_level is LogLevel(level)


@pytest.mark.parametrize(("value", "expected"), [("TRUE", True), (" false ", False)])
def test_booleans_like_bool_parse(tmp_path: Path, value: str, expected: bool) -> None:
    assert (
        load(tmp_path, Smtp__Mx__ValidateRecipients=value).smtp.mx.validate_recipients is expected
    )


@pytest.mark.parametrize("value", ["1", "48", "128"])
def test_client_ipv6_prefix_length_accepts_1_to_128(tmp_path: Path, value: str) -> None:
    settings = load(tmp_path, Smtp__ClientIpv6PrefixLength=value)
    assert settings.smtp.client_ipv6_prefix_length == int(value)


@pytest.mark.parametrize("name", ["mail_1.example.com", "192.0.2.1", "relay-host_01"])
def test_server_name_the_original_accepts_starts(tmp_path: Path, name: str) -> None:
    """The original took any string; one that is no DNS name gets a start-up warning."""
    assert load(tmp_path, f"--Smtp:ServerName={name}").smtp.server_name == name
    assert not is_host_name(name)


def test_server_name_in_unicode_becomes_its_a_label(tmp_path: Path) -> None:
    settings = load(tmp_path, "--Smtp:ServerName=mail.bücher.example")
    assert settings.smtp.server_name == "mail.xn--bcher-kva.example"
    assert is_host_name(settings.smtp.server_name)


def test_port_message_is_exact(tmp_path: Path) -> None:
    err = error(tmp_path, Smtp__Port="abc")
    assert str(err) == 'Smtp:Port: "abc" is not a port number (0-65535)'
    assert err.key == "Smtp:Port"


INVALID = [
    ("Smtp:ServerName", "mail example.com", "is not a domain name"),
    ("Smtp:ServerName", "mail\x07bell", "is not a domain name"),
    ("Smtp:Port", "65536", "is not a port number (0-65535)"),
    ("Smtp:Port", "-1", "is not a port number (0-65535)"),
    ("Smtp:Port", "1_000", "is not a port number (0-65535)"),
    ("Smtp:SecurePort", "465.0", "is not a port number (0-65535)"),
    ("Smtp:RequireAuthentication", "yes", "is not a boolean (true or false)"),
    ("Smtp:RequireAuthentication", "1", "is not a boolean (true or false)"),
    ("Smtp:MaxAttachmentSizeBytes", "0", "is not a positive whole number"),
    ("Smtp:MaxMessageSizeBytes", "50MB", "is not a positive whole number"),
    ("Smtp:AllowInsecureAuth", "on", "is not a boolean"),
    ("Smtp:BareLineEndings", "strip", "is not one of: normalize, reject"),
    ("Smtp:MaxRecipients", "0", "is not a positive whole number"),
    ("Smtp:Mime:MaxParts", "0", "is not a positive whole number"),
    ("Smtp:SpoolThresholdBytes", "0", "is not a positive whole number"),
    ("Smtp:MaxBufferedBytes", "-1", "is not a positive whole number"),
    ("Storage:SpoolPath", "no/such/dir", "does not exist"),
    ("Smtp:Mime:MaxNestingDepth", "-3", "is not a positive whole number"),
    ("Smtp:Mime:MaxHeaderBytes", "lots", "is not a positive whole number"),
    ("Smtp:Mime:MaxHeaderRecipients", "0", "is not a positive whole number"),
    ("Smtp:Mime:ParseCpuSeconds", "0", "is not a positive number"),
    ("Smtp:Mime:ParseMemoryBytes", "1000", "is not a byte count of 268435456 or more"),
    ("Smtp:MaxErrors", "ten", "is not a positive whole number"),
    ("Smtp:MaxRecipientErrors", "0", "is not a positive whole number"),
    ("Smtp:CommandTimeoutSeconds", "0", "is not a positive number"),
    ("Smtp:CommandTimeoutSeconds", "nan", "is not a positive number"),
    ("Smtp:DataTimeoutSeconds", "1e999", "is not a positive number"),
    ("Smtp:DataTimeoutSeconds", "-3", "is not a positive number"),
    ("Smtp:MinDataRateBytesPerSecond", "-1", "is not a whole number of 0 or more"),
    ("Smtp:TlsHandshakeTimeoutSeconds", "30s", "is not a positive number"),
    ("Smtp:MaxConnections", "0", "is not a positive whole number"),
    ("Smtp:MaxConnectionsPerIp", "-5", "is not a whole number of 0 or more"),
    ("Smtp:ClientIpv6PrefixLength", "0", "is not an IPv6 prefix length (1-128)"),
    ("Smtp:ClientIpv6PrefixLength", "129", "is not an IPv6 prefix length (1-128)"),
    ("Smtp:ClientIpv6PrefixLength", "/64", "is not an IPv6 prefix length (1-128)"),
    ("Smtp:ConnectionLimitExemptNetworks:0", "10.0.0.300/8", "is not an IP network"),
    ("Smtp:ShutdownTimeoutSeconds", "0", "is not a positive number"),
    ("Smtp:RestrictSenderToLogin", "maybe", "is not a boolean"),
    ("Smtp:Mx:Enabled", "enabled", "is not a boolean"),
    ("Smtp:Mx:Port", "70000", "is not a port number"),
    ("Smtp:Mx:HostedDomains:0", "exa mple.com", "is not a domain name"),
    ("Smtp:Mx:HostedDomains:0", "-bad.example", "is not a domain name"),
    ("Smtp:Mx:HostedDomains:0", "a..example", "is not a domain name"),
    ("Smtp:Mx:HostedDomains:0", "192.0.2.1", "is an IP address, not a domain name"),
    ("Smtp:Mx:HostedDomains:0", "[192.0.2.1]", "is not a domain name"),
    ("Smtp:Mx:ValidateRecipients", "no", "is not a boolean"),
    ("Smtp:ProxyProtocol:Listeners:0", "smtp", "is not a listener name (submission, "),
    ("Smtp:ProxyProtocol:TrustedNetworks:0", "lb.internal", "is not an IP network"),
    ("HealthCheck:Url", "https://localhost:8081", "is not an http:// URL"),
    ("HealthCheck:Url", "localhost:8081", "is not an http:// URL"),
    ("HealthCheck:Url", "http://localhost:99999", "has an invalid port (0-65535)"),
    ("HealthCheck:Url", "http://localhost:8081/healthz", "must not have a path"),
    ("HealthCheck:DnsMxDomain", "gmail_com", "is not a domain name"),
    ("Api:BaseUrl", "localhost:5000", "is not an http:// or https:// URL"),
    ("Api:BaseUrl", "ftp://api.example", "is not an http:// or https:// URL"),
    ("Api:BaseUrl", "http://api:port", "has an invalid port"),
    ("Api:TimeoutSeconds", "0", "is not a positive number"),
    ("Security:RateLimit:MaxFailedAttempts", "five", "is not a whole number (32-bit)"),
    ("Security:RateLimit:MaxFailedAttempts", "2147483648", "is not a whole number (32-bit)"),
    ("Security:RateLimit:LockoutWindow", "0", "is not a positive TimeSpan"),
    ("Security:RateLimit:LockoutWindow", "-00:15:00", "is not a positive TimeSpan"),
    ("Security:RateLimit:LockoutWindow", "15m", "is not a TimeSpan ([-][d.]hh:mm[:ss"),
    ("Security:RateLimit:LockoutWindow", "00:15:", "is not a TimeSpan"),
    ("Security:RateLimit:LockoutWindow", "24:00", "is out of range for a TimeSpan (hours 0-23"),
    ("Security:RateLimit:LockoutWindow", "10675200", "is out of range for a TimeSpan"),
    ("Security:RateLimit:BaseBackoffDelay", "1.5", "is not a TimeSpan"),
    ("Security:RateLimit:BaseBackoffDelay", "+00:00:01", "is not a TimeSpan"),
    ("Security:RateLimit:MaxBackoffDelay", "00:00:60", "is out of range for a TimeSpan"),
    ("Security:RateLimit:MaxBackoffDelay", "00:00:00.12345678", "is out of range"),
    ("Storage:DiscardMessages", "sometimes", "is not a boolean"),
    ("Smtp:Mx:SenderAuthentication:Mode", "on", "is not one of: off, observe, enforce"),
    ("Smtp:Mx:SenderAuthentication:DnsServers:0", "dns.example", "is not a DNS server address"),
    ("Smtp:Mx:SenderAuthentication:DnsServers:0", "192.0.2.53:0", "is not a DNS server"),
    ("Smtp:Mx:SenderAuthentication:DnsTimeoutSeconds", "0", "is not a positive number"),
    ("Smtp:Mx:SenderAuthentication:RejectSpfFail", "yes", "is not a boolean"),
    ("Otel:Endpoint", "collector:4317", "is not an http:// or https:// URL"),
    ("Logging:LogLevel:Default", "Verbose", "is not a log level (Trace, Debug, Information"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), INVALID)
def test_invalid_value(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    err = error(tmp_path, f"--{key.lower()}={value}")
    canonical = key.removesuffix(":0")
    assert err.key == canonical
    assert str(err).startswith(f'{canonical}: "{value}" ')
    assert fragment in err.message


@pytest.mark.parametrize(("key", "value", "fragment"), INVALID[:3])
def test_invalid_value_from_json_and_environment(
    tmp_path: Path, key: str, value: str, fragment: str
) -> None:
    assert fragment in str(error(tmp_path, **{key.replace(":", "__"): value}))
    section, name = key.split(":")
    write(tmp_path, "appsettings.json", {section: {name: value}})
    assert fragment in str(error(tmp_path))


def test_every_key_is_validated_or_free_text() -> None:
    validated = {key.removesuffix(":0") for key, _, _ in INVALID}
    free_text = {
        "Smtp:CertificatePath",  # tested with the file checks
        "Smtp:CertificateKeyPath",
        "Smtp:CertificatePassword",
        "ConnectionStrings:DefaultConnection",
        "Internal:ApiKey",
        "Security:AuthenticationSalt",
        "Storage:SqlitePath",
    }
    assert validated | free_text == set(KNOWN_KEYS)


def test_hosted_domains_are_normalised(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "--Smtp:Mx:HostedDomains:0=Example.COM.",
        "--Smtp:Mx:HostedDomains:1=exämple.com",
        "--Smtp:Mx:HostedDomains:2=example.com",
        "--Smtp:Mx:HostedDomains:3=XN--EXMPLE-CUA.com",
    )
    assert settings.smtp.mx.hosted_domains == ("example.com", "xn--exmple-cua.com")


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://+:8081", "::", 8081),  # every interface, IPv6 and IPv4
        ("http://*:8081", "::", 8081),
        ("http://localhost:8081", "localhost", 8081),  # both loopbacks
        ("HTTP://LocalHost:8081/", "localhost", 8081),
        ("http://127.0.0.1:0", "127.0.0.1", 0),
        ("http://[::1]:9000", "::1", 9000),
        ("http://0.0.0.0:8081", "::", 8081),
        ("http://[::]:8081", "::", 8081),
        ("http://localhost", "localhost", 80),
        ("http://health.example:8081", "::", 8081),  # Kestrel: names bind everywhere
    ],
)
def test_health_url_forms(tmp_path: Path, url: str, host: str, port: int) -> None:
    health = load(tmp_path, HealthCheck__Url=url).health_check
    assert (health.url, health.endpoints) == (url, ((host, port),))


def test_health_urls_separated_by_semicolons(tmp_path: Path) -> None:
    url = "http://localhost:8081; http://10.0.0.5:9000;;"
    health = load(tmp_path, HealthCheck__Url=url).health_check
    assert health.endpoints == (("localhost", 8081), ("10.0.0.5", 9000))
    err = error(tmp_path, HealthCheck__Url="http://localhost:8081;https://x:1")
    assert (err.key, "is not an http:// URL" in err.message) == ("HealthCheck:Url", True)


@pytest.mark.parametrize("port", ["-1", "-465", "0"])
def test_secure_port_zero_or_less_disables_it(tmp_path: Path, port: str) -> None:
    assert load(tmp_path, Smtp__SecurePort=port, Smtp__Port="465").smtp.secure_port == int(port)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("00:00:04", 4.0),
        ("1", 86_400.0),  # a bare integer is days, as TimeSpan.Parse reads it
        ("1.02:03:04.5", 93_784.5),
        ("00:15", 900.0),
        (" 00:15:00 ", 900.0),
        ("0:0:0.250", 0.25),
        ("10.12:00", 907_200.0),
        ("00:00:00.0000001", 1e-7),
        ("0023:0059:0059.0099", 86_399.0099),
        ("24:00:00", 24 * 86_400.0),  # .NET: three numbers, first over 23 → d:h:m
        ("1:02:03:04", 93_784.0),  # the invariant culture's own d:h:mm:ss
    ],
)
def test_rate_limit_delays_are_dotnet_timespans(tmp_path: Path, value: str, seconds: float) -> None:
    rate_limit = load(
        tmp_path,
        f"Security:RateLimit:LockoutWindow={value}",
        f"Security:RateLimit:BaseBackoffDelay={value}",
        f"--Security:RateLimit:MaxBackoffDelay={value}",
    ).security.rate_limit
    assert rate_limit.lockout_window_seconds == pytest.approx(seconds)
    assert rate_limit.base_backoff_delay_seconds == pytest.approx(seconds)
    assert rate_limit.max_backoff_delay_seconds == pytest.approx(seconds)


def test_what_the_original_accepts_for_rate_limits_starts(tmp_path: Path) -> None:
    """MaxFailedAttempts 0 or less locks at the first failure there, and a negative
    backoff is no backoff; only a window of zero or less is refused (see the limiter)."""
    rate_limit = load(
        tmp_path,
        "Security:RateLimit:MaxFailedAttempts=0",
        "Security:RateLimit:BaseBackoffDelay=-00:00:01",
        "Security:RateLimit:MaxBackoffDelay=-1",
    ).security.rate_limit
    assert rate_limit.max_failed_attempts == 0
    assert rate_limit.base_backoff_delay_seconds == -1.0
    assert rate_limit.max_backoff_delay_seconds == -86_400.0
    assert load(tmp_path, "Security:RateLimit:MaxFailedAttempts=-2147483648")


@pytest.mark.parametrize(
    "value",
    [
        "Host=db;Port=5432;Database=relate;Username=relate;Password=s3cret",
        "postgresql://relate:s3cret@db:5432/relate",
    ],
)
def test_valid_connection_strings_are_kept(tmp_path: Path, value: str) -> None:
    settings = load(tmp_path, ConnectionStrings__DefaultConnection=value)
    assert settings.default_connection == value


@pytest.mark.parametrize(
    "value",
    ["Host=db;Password=s3cret;Bogus=1", "Host=db;Password=s3cret;Port=many", "anything"],
)
def test_bad_connection_string_names_the_key_not_the_password(tmp_path: Path, value: str) -> None:
    err = error(tmp_path, ConnectionStrings__DefaultConnection=value)
    assert err.key == "ConnectionStrings:DefaultConnection"
    assert "s3cret" not in str(err)
