"""Sources and their order: appsettings files, the environment name, environment variables,
arrays, overrides, precedence and case."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relate_smtp import config
from relate_smtp.config import (
    ConfigError,
    LogLevel,
    is_override,
    load_settings,
    split_overrides,
)
from relate_smtp.listener_kind import ListenerKind
from relate_smtp.protocol import BareLineEndings
from tests.config.helpers import error, load, write


def test_process_environment_and_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "appsettings.json", {"Smtp": {"SecurePort": 2465}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("Smtp__Port", "2587")
    settings = load_settings()
    assert (settings.smtp.port, settings.smtp.secure_port) == (2587, 2465)


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
        bare_line_endings=BareLineEndings.REJECT,
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
            listeners=(ListenerKind.MX, ListenerKind.SUBMISSION_TLS),
            trusted_networks=(net("192.0.2.0/24"),),
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
    assert s.log_level is LogLevel.WARNING


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
    assert settings.log_level is LogLevel.DEBUG


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


def test_the_earlier_rate_limit_key_names_are_not_read(tmp_path: Path) -> None:
    rate_limit = load(
        tmp_path,
        Security__RateLimit__LockoutWindowMinutes="1",
        Security__RateLimit__BaseBackoffDelaySeconds="5",
        Security__RateLimit__MaxBackoffDelaySeconds="6",
    ).security.rate_limit
    assert rate_limit == config.RateLimitSettings()
