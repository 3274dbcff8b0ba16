"""Configuration loading: sources and their order, conversion, and every error message."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from relate_smtp import config
from relate_smtp.config import (
    KNOWN_KEYS,
    ConfigError,
    Settings,
    is_host_name,
    is_override,
    load_settings,
    split_overrides,
)

REPO = Path(__file__).resolve().parents[1]


def write(directory: Path, name: str, content: dict[str, Any] | str) -> Path:
    path = directory / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def load(tmp_path: Path, *overrides: str, **environ: str) -> Settings:
    return load_settings(overrides=overrides, environ=environ, cwd=str(tmp_path))


def error(tmp_path: Path, *overrides: str, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, *overrides, **environ)
    return caught.value


# --- defaults ----------------------------------------------------------------


def test_no_sources_gives_the_attrs_defaults(tmp_path: Path) -> None:
    assert load(tmp_path) == Settings()


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("smtp.server_name", "localhost"),
        ("smtp.port", 587),
        ("smtp.secure_port", 465),
        ("smtp.require_authentication", True),
        ("smtp.certificate_path", None),
        ("smtp.max_attachment_size_bytes", 26_214_400),
        ("smtp.max_message_size_bytes", 52_428_800),
        ("smtp.allow_insecure_auth", True),
        ("smtp.bare_line_endings", "normalize"),
        ("smtp.max_recipients", 100),
        ("smtp.max_errors", 10),
        ("smtp.max_recipient_errors", 20),
        ("smtp.command_timeout_seconds", 300),
        ("smtp.data_timeout_seconds", 180),
        ("smtp.min_data_rate_bytes_per_second", 500),
        ("smtp.tls_handshake_timeout_seconds", 30),
        ("smtp.max_connections", 1000),
        ("smtp.max_connections_per_ip", 50),
        ("smtp.client_ipv6_prefix_length", 64),
        (
            "smtp.connection_limit_exempt_networks",
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        ),
        ("smtp.shutdown_timeout_seconds", 20),
        ("smtp.restrict_sender_to_login", False),
        ("smtp.mx.enabled", False),
        ("smtp.mx.port", 25),
        ("smtp.mx.hosted_domains", ()),
        ("smtp.mx.validate_recipients", True),
        ("smtp.proxy_protocol.listeners", ()),
        ("default_connection", ""),
        ("health_check.url", "http://localhost:8081"),
        ("health_check.endpoints", (("localhost", 8081),)),
        ("health_check.dns_mx_domain", "gmail.com"),
        ("api.base_url", "http://localhost:5000"),
        ("api.timeout_seconds", 10),
        ("internal_api_key", None),
        ("security.authentication_salt", ""),
        ("security.rate_limit.max_failed_attempts", 5),
        ("security.rate_limit.lockout_window_seconds", 900),
        ("security.rate_limit.base_backoff_delay_seconds", 1),
        ("security.rate_limit.max_backoff_delay_seconds", 30),
        ("storage.sqlite_path", "relate-smtp.db"),
        ("storage.discard_messages", False),
        ("log_level", "Information"),
        ("environment", "Production"),
    ],
)
def test_defaults_are_the_specified_ones(tmp_path: Path, attribute: str, expected: object) -> None:
    value: object = load(tmp_path)
    for name in attribute.split("."):
        value = getattr(value, name)
    assert value == expected


def test_process_environment_and_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "appsettings.json", {"Smtp": {"SecurePort": 2465}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("Smtp__Port", "2587")
    settings = load_settings()
    assert (settings.smtp.port, settings.smtp.secure_port) == (2587, 2465)


# --- appsettings files -----------------------------------------------------------


def test_json_file_sets_every_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    write(
        tmp_path,
        "appsettings.json",
        {
            "Smtp": {
                "ServerName": "mail.example.com",
                "Port": 2587,
                "SecurePort": 0,
                "RequireAuthentication": False,
                "CertificatePath": "cert.pem",
                "CertificatePassword": "s3cret",
                "CertificateKeyPath": str(tmp_path / "key.pem"),
                "MaxAttachmentSizeBytes": 1000,
                "MaxMessageSizeBytes": 2000,
                "AllowInsecureAuth": False,
                "BareLineEndings": "Reject",
                "MaxRecipients": 7,
                "MaxErrors": 3,
                "CommandTimeoutSeconds": 1.5,
                "DataTimeoutSeconds": 2,
                "MinDataRateBytesPerSecond": 0,
                "TlsHandshakeTimeoutSeconds": 4,
                "MaxConnections": 9,
                "MaxConnectionsPerIp": 0,
                "ConnectionLimitExemptNetworks": ["10.0.0.0/8", "2001:db8::1"],
                "ShutdownTimeoutSeconds": 5,
                "RestrictSenderToLogin": True,
                "Mx": {
                    "Enabled": True,
                    "Port": 2525,
                    "HostedDomains": ["Example.COM.", "mail.example.com"],
                    "ValidateRecipients": False,
                },
                "ProxyProtocol": {
                    "Listeners": ["mx", "Submission-TLS"],
                    "TrustedNetworks": ["192.0.2.0/24"],
                },
            },
            "ConnectionStrings": {"DefaultConnection": "Host=db;Database=relate"},
            "HealthCheck": {"Url": "http://+:9090", "DnsMxDomain": "example.org"},
            "Api": {"BaseUrl": "https://api.example.com", "TimeoutSeconds": 3},
            "Internal": {"ApiKey": "k"},
            "Security": {
                "AuthenticationSalt": "salt",
                "RateLimit": {
                    "MaxFailedAttempts": 2,
                    "LockoutWindow": "00:01:00",
                    "BaseBackoffDelay": 0,  # a JSON number is read as its text: 0 days
                    "MaxBackoffDelay": "00:00:08",
                },
            },
            "Storage": {"SqlitePath": "/var/lib/relate.db", "DiscardMessages": True},
            "Logging": {"LogLevel": {"Default": "warning", "Microsoft": "Error"}},
        },
    )
    s = load(tmp_path)
    net = ipaddress.ip_network
    assert s.smtp == config.SmtpSettings(
        server_name="mail.example.com",
        port=2587,
        secure_port=0,
        require_authentication=False,
        certificate_path=str(tmp_path / "cert.pem"),
        certificate_password="s3cret",
        certificate_key_path=str(tmp_path / "key.pem"),
        max_attachment_size_bytes=1000,
        max_message_size_bytes=2000,
        allow_insecure_auth=False,
        bare_line_endings="reject",
        max_recipients=7,
        max_errors=3,
        command_timeout_seconds=1.5,
        data_timeout_seconds=2.0,
        min_data_rate_bytes_per_second=0,
        tls_handshake_timeout_seconds=4.0,
        max_connections=9,
        max_connections_per_ip=0,
        connection_limit_exempt_networks=(net("10.0.0.0/8"), net("2001:db8::1/128")),
        shutdown_timeout_seconds=5.0,
        restrict_sender_to_login=True,
        mx=config.MxSettings(
            enabled=True,
            port=2525,
            hosted_domains=("example.com", "mail.example.com"),
            validate_recipients=False,
        ),
        proxy_protocol=config.ProxyProtocolSettings(
            listeners=("mx", "submission-tls"), trusted_networks=(net("192.0.2.0/24"),)
        ),
    )
    assert s.default_connection == "Host=db;Database=relate"
    assert s.health_check == config.HealthCheckSettings(
        url="http://+:9090", dns_mx_domain="example.org", endpoints=(("::", 9090),)
    )
    assert s.api == config.ApiSettings(base_url="https://api.example.com", timeout_seconds=3.0)
    assert s.internal_api_key == "k"
    assert s.security == config.SecuritySettings(
        authentication_salt="salt",
        rate_limit=config.RateLimitSettings(
            max_failed_attempts=2,
            lockout_window_seconds=60.0,
            base_backoff_delay_seconds=0.0,
            max_backoff_delay_seconds=8.0,
        ),
    )
    assert s.storage == config.StorageSettings(
        sqlite_path="/var/lib/relate.db", discard_messages=True
    )
    assert s.log_level == "Warning"


def test_json_comments_and_trailing_commas_are_allowed(tmp_path: Path) -> None:
    write(
        tmp_path,
        "appsettings.json",
        """{
          // the submission port
          "Smtp": {
            "Port": 2587, /* block
            comment */
            "ServerName": "http://not a comment//x",
            "Mx": {"HostedDomains": ["a.example", "b.example",],},
          },
        }""",
    )
    with pytest.raises(ConfigError, match="Smtp:ServerName"):
        load(tmp_path)  # proves the "//" inside the string survived
    settings = load(tmp_path, "--Smtp:ServerName=mx.example")
    assert settings.smtp.port == 2587
    assert settings.smtp.mx.hosted_domains == ("a.example", "b.example")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"Smtp": {"Port": 1,,}}', "line 1"),
        ('{\n"Smtp": \n{"Port" 1}}', "line 3 column 9"),
        ("[1, 2]", "JSON object"),
        ('{"Smtp": {"Port": 1, "PORT": 2}}', 'duplicate key "Smtp:PORT"'),
        ('{"Smtp": {"Port": 1, "Port": 2}}', "duplicate key"),
    ],
)
def test_bad_json_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, "appsettings.json", text)
    err = error(tmp_path)
    assert err.key == str(path)
    assert fragment in err.message


def test_json_numbers_keep_their_text(tmp_path: Path) -> None:
    write(tmp_path, "appsettings.json", '{"Smtp": {"Port": 25.0}}')
    assert '"25.0" is not a port number' in str(error(tmp_path))


def test_config_file_option(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path, "appsettings.json", {"Smtp": {"Port": 1111}})  # not read: --config wins
    write(tmp_path / "etc", "smtp.json", {"Smtp": {"SecurePort": 2465}})
    settings = load_settings(config_file="etc/smtp.json", environ={}, cwd=str(tmp_path))
    assert (settings.smtp.port, settings.smtp.secure_port) == (587, 2465)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file="nope.json", environ={}, cwd=str(tmp_path))
    assert caught.value.key == "--config"
    assert '"nope.json" does not exist' in str(caught.value)


def test_missing_default_file_is_fine(tmp_path: Path) -> None:
    assert load(tmp_path).smtp.port == 587


@pytest.mark.parametrize(
    ("environ", "environment"),
    [
        ({"DOTNET_ENVIRONMENT": "Development"}, "Development"),
        ({"ASPNETCORE_ENVIRONMENT": "Development"}, "Development"),
        ({"DOTNET_ENVIRONMENT": "Development", "ASPNETCORE_ENVIRONMENT": "Staging"}, "Development"),
        ({"DOTNET_ENVIRONMENT": "", "ASPNETCORE_ENVIRONMENT": "Staging"}, "Staging"),
        ({}, "Production"),
    ],
)
def test_environment_file(tmp_path: Path, environ: dict[str, str], environment: str) -> None:
    write(tmp_path, "appsettings.json", {"Smtp": {"Port": 1000, "SecurePort": 1001}})
    for name in ("Development", "Staging", "Production"):
        write(tmp_path, f"appsettings.{name}.json", {"Smtp": {"ServerName": name.lower()}})
    write(tmp_path, "appsettings.Development.json", {"Smtp": {"Port": 2000, "ServerName": "dev"}})
    settings = load(tmp_path, **environ)
    assert settings.environment == environment
    assert settings.smtp.secure_port == 1001
    if environment == "Development":
        assert (settings.smtp.port, settings.smtp.server_name) == (2000, "dev")
    else:
        assert (settings.smtp.port, settings.smtp.server_name) == (1000, environment.lower())


def test_environment_file_beside_config_file_and_without_base(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", "base.json", {"Smtp": {"Port": 1000}})
    write(tmp_path / "etc", "appsettings.Test.json", {"Smtp": {"Port": 3000}})
    env = {"DOTNET_ENVIRONMENT": "Test"}
    by_file = load_settings(config_file="etc/base.json", environ=env, cwd=str(tmp_path))
    assert by_file.smtp.port == 3000
    write(tmp_path, "appsettings.Test.json", {"Smtp": {"Port": 4000}})
    assert load(tmp_path, **env).smtp.port == 4000  # no appsettings.json in cwd


def test_command_line_environment_wins(tmp_path: Path) -> None:
    write(tmp_path, "appsettings.Staging.json", {"Smtp": {"Port": 3000}})
    settings = load(tmp_path, "--environment", "Staging", DOTNET_ENVIRONMENT="Development")
    assert (settings.environment, settings.smtp.port) == ("Staging", 3000)


# --- the Production rule (SPEC §2, ConnectionStrings:DefaultConnection) ----------------


@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        ((), {"DOTNET_ENVIRONMENT": "Production"}),
        ((), {"ASPNETCORE_ENVIRONMENT": "production"}),
        ((), {"DOTNET_ENVIRONMENT": " ", "ASPNETCORE_ENVIRONMENT": "Production"}),
        (("--environment", "Production"), {"DOTNET_ENVIRONMENT": "Development"}),
        (("ConnectionStrings:DefaultConnection=",), {"DOTNET_ENVIRONMENT": "Production"}),
        (("Storage:SqlitePath= ",), {"DOTNET_ENVIRONMENT": "Production"}),
    ],
)
def test_explicit_production_without_a_database_refuses(
    tmp_path: Path, overrides: tuple[str, ...], environ: dict[str, str]
) -> None:
    """The original throws in Production without a connection string; a container must
    never keep mail in a file that dies with it."""
    caught = error(tmp_path, *overrides, **environ)
    assert caught.key == "ConnectionStrings:DefaultConnection"
    assert "ConnectionStrings:DefaultConnection is required" in str(caught)
    assert "ConnectionStrings__DefaultConnection" in str(caught)


@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        ((), {}),  # Production by default, but not named: the quickstart
        ((), {"DOTNET_ENVIRONMENT": "Development", "ASPNETCORE_ENVIRONMENT": "Production"}),
        ((), {"ASPNETCORE_ENVIRONMENT": "Staging"}),
        (("Storage:SqlitePath=/data/relate.db",), {"DOTNET_ENVIRONMENT": "Production"}),
        (
            ("ConnectionStrings:DefaultConnection=Host=db;Database=relate",),
            {"ASPNETCORE_ENVIRONMENT": "Production"},
        ),
    ],
)
def test_production_rule_leaves_other_set_ups_alone(
    tmp_path: Path, overrides: tuple[str, ...], environ: dict[str, str]
) -> None:
    assert load(tmp_path, *overrides, **environ).smtp.port == 587


def test_production_sqlite_path_may_come_from_the_environment(tmp_path: Path) -> None:
    settings = load(
        tmp_path, DOTNET_ENVIRONMENT="Production", Storage__SqlitePath="/data/relate.db"
    )
    assert (settings.environment, settings.default_connection) == ("Production", "")


# --- environment variables -------------------------------------------------------


def test_environment_variables(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        Smtp__Port="2587",
        Smtp__Mx__Enabled="true",
        Smtp__Mx__HostedDomains__0="a.example",
        Smtp__Mx__HostedDomains__1="b.example",
        **{"Smtp:SecurePort": "2465"},  # ASP.NET also takes the ':' form
        Security__RateLimit__MaxFailedAttempts="9",
        Logging__LogLevel__Default="Debug",
        PATH="/usr/bin",
        HOME="/root",
        Other__Port="not-a-port",
        Smtp="ignored",
    )
    assert settings.smtp.port == 2587
    assert settings.smtp.secure_port == 2465
    assert settings.smtp.mx.hosted_domains == ("a.example", "b.example")
    assert settings.security.rate_limit.max_failed_attempts == 9
    assert settings.log_level == "Debug"


@pytest.mark.parametrize(
    "name",
    [
        "ConnectionStrings__DefaultConnection",
        "CUSTOMCONNSTR_DefaultConnection",
        "POSTGRESQLCONNSTR_DefaultConnection",
    ],
)
def test_connection_string_variables(tmp_path: Path, name: str) -> None:
    settings = load(tmp_path, **{name: "postgresql://u:p@db/relate"})
    assert settings.default_connection == "postgresql://u:p@db/relate"


def test_arrays_merge_per_index(tmp_path: Path) -> None:
    write(
        tmp_path,
        "appsettings.json",
        {"Smtp": {"Mx": {"HostedDomains": ["a.example", "b.example", "c.example"]}}},
    )
    settings = load(tmp_path, Smtp__Mx__HostedDomains__1="x.example")
    assert settings.smtp.mx.hosted_domains == ("a.example", "x.example", "c.example")
    settings = load(tmp_path, "--Smtp:Mx:HostedDomains:3=d.example")
    assert settings.smtp.mx.hosted_domains == ("a.example", "b.example", "c.example", "d.example")
    # An emptied index is dropped, so a later source can shorten an array.
    settings = load(tmp_path, Smtp__Mx__HostedDomains__0="", Smtp__Mx__HostedDomains__2="")
    assert settings.smtp.mx.hosted_domains == ("b.example",)


def test_array_indexes_sort_numerically(tmp_path: Path) -> None:
    environ = {f"Smtp__Mx__HostedDomains__{i}": f"d{i}.example" for i in (10, 2, 0, 1)}
    settings = load(tmp_path, **environ)
    assert settings.smtp.mx.hosted_domains == (
        "d0.example",
        "d1.example",
        "d2.example",
        "d10.example",
    )


def test_plain_value_is_a_comma_separated_list(tmp_path: Path) -> None:
    settings = load(tmp_path, Smtp__Mx__HostedDomains="a.example, b.example,")
    assert settings.smtp.mx.hosted_domains == ("a.example", "b.example")


@pytest.mark.parametrize("value", ["1", "48", "128"])
def test_client_ipv6_prefix_length_accepts_1_to_128(tmp_path: Path, value: str) -> None:
    settings = load(tmp_path, Smtp__ClientIpv6PrefixLength=value)
    assert settings.smtp.client_ipv6_prefix_length == int(value)


def test_array_replaces_default_array(tmp_path: Path) -> None:
    write(tmp_path, "appsettings.json", {"Smtp": {"ConnectionLimitExemptNetworks": ["10.0.0.1"]}})
    exempt = load(tmp_path).smtp.connection_limit_exempt_networks
    assert exempt == (ipaddress.ip_network("10.0.0.1/32"),)
    write(tmp_path, "appsettings.json", {"Smtp": {"ConnectionLimitExemptNetworks": []}})
    assert load(tmp_path).smtp.connection_limit_exempt_networks == ()


def test_array_index_must_be_a_number(tmp_path: Path) -> None:
    err = error(tmp_path, "--Smtp:Mx:HostedDomains:first=a.example")
    assert err.key == "Smtp:Mx:HostedDomains"
    assert '"first" is not an array index' in err.message
    write(tmp_path, "appsettings.json", {"Smtp": {"Mx": {"HostedDomains": [{"Name": "a"}]}}})
    assert error(tmp_path).key == "Smtp:Mx:HostedDomains:0"


# --- command-line overrides ------------------------------------------------------


@pytest.mark.parametrize(
    "tokens",
    [
        ["--Smtp:Port=2587"],
        ["--Smtp:Port", "2587"],
        ["/Smtp:Port=2587"],
        ["/Smtp:Port", "2587"],
        ["Smtp:Port=2587"],
        ["--Smtp:Port=1", "--Smtp:Port=2587"],
    ],
)
def test_override_syntaxes(tmp_path: Path, tokens: list[str]) -> None:
    assert load(tmp_path, *tokens).smtp.port == 2587


def test_override_value_may_contain_equals_sign(tmp_path: Path) -> None:
    settings = load(tmp_path, "--ConnectionStrings:DefaultConnection=Host=db;Password=a=b")
    assert settings.default_connection == "Host=db;Password=a=b"


@pytest.mark.parametrize(
    ("tokens", "key", "fragment"),
    [
        (["--Smtp:Port"], "Smtp:Port", "has no value"),
        (["-Smtp:Port=1"], "-Smtp:Port=1", "not a configuration override"),
        (["Smtp:Port"], "Smtp:Port", "not a configuration override"),
        (["--=1"], "--=1", "has no key"),
    ],
)
def test_bad_override_tokens(tmp_path: Path, tokens: list[str], key: str, fragment: str) -> None:
    err = error(tmp_path, *tokens)
    assert (err.key, fragment in err.message) == (key, True)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("--Smtp:Port=1", True),
        ("--Smtp:Port", True),
        ("--smtp:mx:hosteddomains:0=a.example", True),
        ("/Smtp:Port=1", True),
        ("Smtp:Port=1", True),
        ("--environment", True),
        ("--Environment=Development", True),
        ("--config", False),
        ("--config=appsettings.json", False),
        ("--name", False),
        ("serve", False),
        ("user@example.com", False),
        ("Smtp:Port", False),
        ("/etc/relate/appsettings.json", False),
        ("-v", False),
    ],
)
def test_is_override(arg: str, expected: bool) -> None:
    assert is_override(arg) is expected


def test_split_overrides() -> None:
    argv = ["serve", "--config", "a.json", "--Smtp:Port", "2587", "--Smtp:Mx:Enabled=true", "-v"]
    assert split_overrides(argv) == (
        ["--Smtp:Port", "2587", "--Smtp:Mx:Enabled=true"],
        ["serve", "--config", "a.json", "-v"],
    )


# --- precedence and case ----------------------------------------------------------


def test_precedence_end_to_end(tmp_path: Path) -> None:
    write(
        tmp_path,
        "appsettings.json",
        {"Smtp": {"Port": 1, "SecurePort": 1, "MaxErrors": 1, "MaxRecipients": 1}},
    )
    write(
        tmp_path,
        "appsettings.Development.json",
        {"Smtp": {"Port": 2, "SecurePort": 2, "MaxErrors": 2}},
    )
    settings = load(
        tmp_path,
        "--Smtp:Port=4",
        DOTNET_ENVIRONMENT="Development",
        Smtp__Port="3",
        Smtp__SecurePort="3",
    )
    smtp = settings.smtp
    assert (smtp.port, smtp.secure_port, smtp.max_errors, smtp.max_recipients) == (4, 3, 2, 1)
    assert smtp.max_connections == 1000  # from the defaults


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    write(tmp_path, "appsettings.json", {"SMTP": {"port": 1, "mx": {"ENABLED": "TRUE"}}})
    settings = load(tmp_path, "--smtp:MX:hostedDOMAINS:0=A.Example", sMtP__sEcUrEpOrT="2")
    assert settings.smtp.port == 1
    assert settings.smtp.secure_port == 2
    assert settings.smtp.mx.enabled is True
    assert settings.smtp.mx.hosted_domains == ("a.example",)
    assert load(tmp_path, "--SMTP:MX:ENABLED=false", SMTP__PORT="5").smtp.port == 5


def test_blank_values_mean_default(tmp_path: Path) -> None:
    write(tmp_path, "appsettings.json", {"Smtp": {"Port": None, "CertificatePath": ""}})
    settings = load(tmp_path, Smtp__SecurePort="  ", Internal__ApiKey="", Smtp__ServerName="")
    assert (settings.smtp.port, settings.smtp.secure_port) == (587, 465)
    assert settings.smtp.certificate_path is None
    assert settings.smtp.server_name == "localhost"
    assert settings.internal_api_key is None


def test_empty_dns_mx_domain_disables_the_check(tmp_path: Path) -> None:
    assert load(tmp_path, HealthCheck__DnsMxDomain="").health_check.dns_mx_domain == ""
    assert load(tmp_path, HealthCheck__DnsMxDomain="MX.Example.").health_check.dns_mx_domain == (
        "mx.example"
    )


def test_secrets_are_kept_verbatim(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        Internal__ApiKey=" key ",
        Security__AuthenticationSalt=" salt",
        Smtp__CertificatePassword="p@ss ",
    )
    assert settings.internal_api_key == " key "
    assert settings.security.authentication_salt == " salt"
    assert settings.smtp.certificate_password == "p@ss "


@pytest.mark.parametrize(("value", "level"), [("TRACE", "Trace"), ("none", "None"), ("4", "Error")])
def test_log_level_names(tmp_path: Path, value: str, level: str) -> None:
    assert load(tmp_path, f"--Logging:LogLevel:Default={value}").log_level == level


@pytest.mark.parametrize(("value", "expected"), [("TRUE", True), (" false ", False)])
def test_booleans_like_bool_parse(tmp_path: Path, value: str, expected: bool) -> None:
    assert (
        load(tmp_path, Smtp__Mx__ValidateRecipients=value).smtp.mx.validate_recipients is expected
    )


# --- validation -------------------------------------------------------------------


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


def test_mx_without_domains_is_refused(tmp_path: Path) -> None:
    err = error(tmp_path, Smtp__Mx__Enabled="true")
    assert err.key == "Smtp:Mx:HostedDomains"
    assert "open relay" in err.message
    assert "Smtp:Mx:Enabled" in err.message
    write(tmp_path, "appsettings.json", {"Smtp": {"Mx": {"Enabled": True, "HostedDomains": []}}})
    assert error(tmp_path).key == "Smtp:Mx:HostedDomains"
    assert error(tmp_path, Smtp__Mx__HostedDomains__0="").key == "Smtp:Mx:HostedDomains"
    assert load(tmp_path, Smtp__Mx__HostedDomains__0="example.com").smtp.mx.enabled


def test_mx_disabled_needs_no_domains(tmp_path: Path) -> None:
    assert load(tmp_path, Smtp__Mx__Enabled="false").smtp.mx.hosted_domains == ()


def test_proxy_listeners_need_trusted_networks(tmp_path: Path) -> None:
    err = error(tmp_path, Smtp__ProxyProtocol__Listeners__0="mx")
    assert err.key == "Smtp:ProxyProtocol:TrustedNetworks"
    assert "Smtp:ProxyProtocol:Listeners" in err.message
    settings = load(
        tmp_path,
        Smtp__ProxyProtocol__Listeners__0="MX",
        Smtp__ProxyProtocol__TrustedNetworks__0="10.1.2.3/8",
        Smtp__ProxyProtocol__TrustedNetworks__1="2001:db8::1",
    )
    assert settings.smtp.proxy_protocol.listeners == ("mx",)
    assert settings.smtp.proxy_protocol.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::1/128"),
    )


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


def test_port_clash_is_refused(tmp_path: Path) -> None:
    err = error(tmp_path, Smtp__Port="2525", Smtp__SecurePort="2525")
    assert err.key == "Smtp:SecurePort"
    assert "Smtp:Port" in err.message
    domains = {"Smtp__Mx__HostedDomains__0": "example.com"}
    assert load(tmp_path, Smtp__Mx__Port="587", **domains).smtp.mx.port == 587  # MX off
    err = error(tmp_path, Smtp__Mx__Enabled="true", Smtp__Mx__Port="587", **domains)
    assert err.key == "Smtp:Mx:Port"
    assert load(tmp_path, Smtp__Port="0", Smtp__Mx__Port="0", Smtp__SecurePort="0").smtp.port == 0


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


def test_the_earlier_rate_limit_key_names_are_not_read(tmp_path: Path) -> None:
    rate_limit = load(
        tmp_path,
        Security__RateLimit__LockoutWindowMinutes="1",
        Security__RateLimit__BaseBackoffDelaySeconds="5",
        Security__RateLimit__MaxBackoffDelaySeconds="6",
    ).security.rate_limit
    assert rate_limit == config.RateLimitSettings()


# --- files and the connection-string hook -------------------------------------------


def test_certificate_paths_are_resolved_against_cwd(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "cert.pem").write_text("x")
    (tmp_path / "tls" / "key.pem").write_text("x")
    smtp = load(
        tmp_path, Smtp__CertificatePath="tls/cert.pem", Smtp__CertificateKeyPath="tls/key.pem"
    ).smtp
    assert smtp.certificate_path == str(tmp_path / "tls" / "cert.pem")
    assert smtp.certificate_key_path == str(tmp_path / "tls" / "key.pem")


@pytest.mark.parametrize("key", ["Smtp:CertificatePath", "Smtp:CertificateKeyPath"])
def test_missing_certificate_files(tmp_path: Path, key: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "dir").mkdir()
    base = {"Smtp__CertificatePath": "cert.pem"}
    env_name = key.replace(":", "__")
    err = error(tmp_path, **{**base, env_name: "missing.pem"})
    assert (err.key, err.message) == (key, '"missing.pem" does not exist')
    err = error(tmp_path, **{**base, env_name: "dir"})
    assert (err.key, err.message) == (key, '"dir" is not a file')


def test_unreadable_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    real_open = open

    def deny(path: str, *args: object, **kwargs: object) -> object:
        if str(path) == str(cert):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    # Root reads any file whatever its mode, so the refusal is simulated.
    monkeypatch.setattr("builtins.open", deny)
    err = error(tmp_path, Smtp__CertificatePath="cert.pem")
    assert err.key == "Smtp:CertificatePath"
    assert "cannot be read" in err.message


def test_key_without_certificate(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    err = error(tmp_path, Smtp__CertificateKeyPath="key.pem")
    assert err.key == "Smtp:CertificateKeyPath"
    assert "Smtp:CertificatePath" in err.message


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


# --- documentation ------------------------------------------------------------------


@pytest.mark.parametrize("key", KNOWN_KEYS)
def test_every_key_is_documented(key: str) -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert f"`{key}`" in reference
    assert f"`{key.replace(':', '__')}" in reference


def test_mime_limits_are_read(tmp_path: Path) -> None:
    mime = load(
        tmp_path,
        "Smtp:Mime:MaxParts=50",
        "Smtp:Mime:MaxNestingDepth=7",
        "Smtp:Mime:MaxHeaderBytes=4096",
        "Smtp:Mime:MaxHeaderRecipients=20",
        "Smtp:Mime:ParseCpuSeconds=2.5",
        "Smtp:Mime:ParseMemoryBytes=536870912",
    ).smtp.mime
    assert (mime.limits.max_parts, mime.limits.max_nesting_depth) == (50, 7)
    assert (mime.limits.max_header_bytes, mime.limits.max_header_recipients) == (4096, 20)
    assert (mime.parse.cpu_seconds, mime.parse.memory_bytes) == (2.5, 536_870_912)
