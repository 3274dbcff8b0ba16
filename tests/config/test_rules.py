"""Rules across settings: MX domains, PROXY networks, certificate files, port clashes and
the Production rule."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relate_smtp.listener_kind import ListenerKind
from tests.config.helpers import error, load, write


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
    assert settings.smtp.proxy_protocol.listeners == (ListenerKind.MX,)
    assert settings.smtp.proxy_protocol.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::1/128"),
    )


def test_port_clash_is_refused(tmp_path: Path) -> None:
    err = error(tmp_path, Smtp__Port="2525", Smtp__SecurePort="2525")
    assert err.key == "Smtp:SecurePort"
    assert "Smtp:Port" in err.message
    domains = {"Smtp__Mx__HostedDomains__0": "example.com"}
    assert load(tmp_path, Smtp__Mx__Port="587", **domains).smtp.mx.port == 587  # MX off
    err = error(tmp_path, Smtp__Mx__Enabled="true", Smtp__Mx__Port="587", **domains)
    assert err.key == "Smtp:Mx:Port"
    assert load(tmp_path, Smtp__Port="0", Smtp__Mx__Port="0", Smtp__SecurePort="0").smtp.port == 0


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
